"""Run by test_trainer under ``accelerate launch --num_processes 2``: train a tiny student, report its weights."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from slimdit.distill.trainer import TrainConfig, Trainer  # noqa: E402
from slimdit.models import adapter_for  # noqa: E402
from tests.test_trainer import CFG, _data, _student  # noqa: E402

out = Path(sys.argv[1])
teacher, student, kept = _student()
t = Trainer(adapter_for(student), teacher, student, _data(), TrainConfig(**{**CFG, "steps": 4}), out, kept)
t.train(progress=False)
digest = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in t.student_model().parameters())).hexdigest()
(out / f"rank{t.acc.process_index}_of{t.acc.num_processes}.txt").write_text(digest)
