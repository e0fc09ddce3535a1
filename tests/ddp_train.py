"""Run by test_trainer under ``accelerate launch --num_processes 2``: train a tiny student, report its weights;
then train one whose data is poisoned on rank 1 only, and report where each rank stopped."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from slimdit.distill.trainer import TrainConfig, Trainer  # noqa: E402
from slimdit.errors import TrainingDiverged  # noqa: E402
from slimdit.models import adapter_for  # noqa: E402
from tests.test_trainer import CFG, SCHED, _data, _student  # noqa: E402

out = Path(sys.argv[1])
teacher, student, kept = _student()
t = Trainer(adapter_for(student, SCHED), teacher, student, _data(), TrainConfig(**{**CFG, "steps": 4}), out, kept)
t.train(progress=False)
digest = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in t.student_model().parameters())).hexdigest()
(out / f"rank{t.acc.process_index}_of{t.acc.num_processes}.txt").write_text(digest)

teacher, student, kept = _student()
data = _data()
nan = Trainer(adapter_for(student, SCHED), teacher, student, data, TrainConfig(**{**CFG, "steps": 4}), out / "nan",
              kept)
if nan.acc.process_index == 1:
    data.latents[:] = float("nan")  # only this rank sees a non-finite loss
try:
    nan.train(progress=False)
    stopped = "finished"
except TrainingDiverged as e:
    stopped = str(e).split(" of ")[0]
(out / f"nan_rank{nan.acc.process_index}.txt").write_text(stopped)

# Flux under DDP: the adapter reads the config of the model the wrapper holds; both replicas stay identical
from tests.test_flux import FLOW, flux_data, tiny_flux  # noqa: E402

data4 = flux_data(4)
teacher = tiny_flux(2, 2)
student = tiny_flux(2, 2)
f = Trainer(adapter_for(student, FLOW), teacher, student, data4, TrainConfig(**{**CFG, "steps": 2}), out / "flux")
f.train(progress=False)
digest = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in f.student_model().parameters())).hexdigest()
(out / f"flux_rank{f.acc.process_index}.txt").write_text(digest)

# the conditioning cache under two processes: the main one encodes, the other reads what it wrote
if len(sys.argv) > 2:
    from types import SimpleNamespace

    import slimdit.data.cache as cache
    from slimdit.data.datasets import load_dataset
    from slimdit.distill.run import Conditionings
    from slimdit.pipelines.loading import load_pipeline

    encoded = []
    encode = cache.encode_captions
    cache.encode_captions = lambda p, c, n: encoded.append(len(c)) or encode(p, c, n)
    tiny = sys.argv[2]
    spec = SimpleNamespace(max_sequence_length=16, synth=None, synth_images=0, image_size=None)
    cond = Conditionings(spec, load_dataset("shapes-train:8"), load_pipeline(tiny, "cpu"), tiny, out / "distill",
                         "cpu", 0)("real")
    rows = cond.latents.load()
    (out / f"cache_rank{f.acc.process_index}.txt").write_text(
        f"{sum(encoded)} {hashlib.sha256(rows.numpy().tobytes()).hexdigest()}")
