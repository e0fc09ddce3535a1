"""The adapters to external benchmarks (slimdit.metrics.external): each protocol (prompt counts, images per prompt,
tiling, aggregation) run with a stand-in model and a stand-in scorer, against sums written here from each
benchmark's own definition; and the errors that name what is missing before any model loads."""

from __future__ import annotations

import csv
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from slimdit.metrics.benchmarks import image_seeds
from slimdit.metrics.external.protocol import MissingPackage


class NoiseSampler:
    """A stand-in text-to-image model: image k is noise seeded by its seed; it records what it was asked."""

    def __init__(self, h: int = 6, w: int = 6):
        self.h, self.w, self.prompts, self.seeds = h, w, [], []

    def generate(self, prompts, seeds, progress=True):
        self.prompts += list(prompts)
        self.seeds += list(seeds)
        return np.stack([np.random.default_rng(s).integers(0, 256, (self.h, self.w, 3), dtype=np.uint8)
                         for s in seeds])


def absent(module: str):
    return pytest.mark.skipif(importlib.util.find_spec(module) is not None, reason=f"{module} is installed")


def test_the_core_registers_every_external_benchmark():
    from slimdit import registry

    for name, ipp in {"cmmd": 1, "fid": 1, "hpsv2": 1, "imagereward": 10, "geneval": 4, "dpg-bench": 4}.items():
        b = registry.BENCHMARKS[name]
        assert b.images_per_prompt == ipp and b.data and not b.embedder


# -- CMMD: google-research/cmmd's preprocessing and distance ----------------------------------------------------

def _cmmd_read(im: Image.Image, size: int = 336) -> np.ndarray:
    """google-research/cmmd io_util: crop the centred min(w, h) square, PIL bicubic resize to size."""
    w, h = im.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    return np.asarray(im.crop((left, top, left + side, top + side)).resize((size, size), resample=Image.BICUBIC))


def _cmmd_distance(x: np.ndarray, y: np.ndarray) -> float:
    """google-research/cmmd distance: L2-normalised embeddings, RBF kernel sigma 10, biased MMD^2, x 1000."""
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    y = y / np.linalg.norm(y, axis=1, keepdims=True)

    def k(a, b):
        return np.mean([[np.exp(-np.sum((u - v) ** 2) / (2 * 10.0**2)) for v in b] for u in a])

    return 1000 * (k(x, x) + k(y, y) - 2 * k(x, y))


def _stand_in_embed(images: np.ndarray) -> np.ndarray:
    """A stand-in for CLIP: means of a 6 x 6 grid of blocks per channel, (N, 108)."""
    n, h, w, c = images.shape
    return images.reshape(n, 6, h // 6, 6, w // 6, c).mean((2, 4)).reshape(n, -1).astype(np.float64)


def _reference_set(folder: Path, sizes: list[tuple[int, int]]) -> list[dict]:
    folder.mkdir()
    rows = []
    for i, (w, h) in enumerate(sizes):
        Image.fromarray(np.random.default_rng(100 + i).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(
            folder / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "text": f"caption {i}"})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def test_clip_preprocessing_is_cmmds_pil_crop_and_bicubic_resize():
    import torch

    from slimdit.metrics.embedders import ClipEmbedder

    clip = object.__new__(ClipEmbedder)  # its preprocessing alone; no weights
    clip.size = 336
    clip.mean, clip.std = torch.tensor([0.48, 0.46, 0.41]).view(1, 3, 1, 1), torch.tensor([0.27, 0.26, 0.28]).view(
        1, 3, 1, 1)
    for h, w in [(500, 377), (90, 120), (336, 336)]:  # shrink (antialiased), enlarge, identity
        im = np.random.default_rng(h).integers(0, 256, (2, h, w, 3), dtype=np.uint8)
        want = np.stack([_cmmd_read(Image.fromarray(x)) for x in im]).astype(np.float32) / 255.0
        want = (torch.from_numpy(want).permute(0, 3, 1, 2) - clip.mean) / clip.std
        assert torch.allclose(clip.preprocess(im), want, atol=1e-6)


def test_cmmd_benchmark_equals_the_references_computation(tmp_path):
    from slimdit.metrics.external.cmmd import make_cmmd

    rows = _reference_set(tmp_path / "ref", [(400, 300), (120, 200), (336, 336), (50, 60), (700, 500)])
    seen = []
    sampler = NoiseSampler(h=48, w=64)  # non-square, so the centre crop matters

    def embed(images):
        seen.append(images.shape[1:])
        return _stand_in_embed(images)

    r = make_cmmd(embed=embed, batch_size=2).run(sampler, limit=4, data=tmp_path / "ref", progress=False)
    assert sampler.prompts == [row["text"] for row in rows[:4]] and sampler.seeds == image_seeds(4, 1, 0)
    assert set(seen) == {(336, 336, 3)}
    gen = np.stack([_stand_in_embed(_cmmd_read(Image.fromarray(im))[None])[0] for im in r.images])
    ref = np.stack([_stand_in_embed(_cmmd_read(Image.open(tmp_path / "ref" / f"{i}.png"))[None])[0]
                    for i in range(4)])
    assert r.metrics["cmmd"] == pytest.approx(_cmmd_distance(gen, ref), rel=1e-6, abs=1e-9)
    assert r.metrics["cmmd"] > 0 and r.metrics["n_reference"] == 4 and not r.metrics["complete"]
    assert r.correct is None and r.images.shape == (4, 48, 64, 3)


def test_fid_benchmark_crops_references_to_the_generated_aspect(tmp_path):
    from scipy import linalg

    from slimdit.metrics.external.fid import make_fid

    _reference_set(tmp_path / "ref", [(90, 60), (30, 40), (64, 48), (100, 100), (77, 50), (60, 90)])
    seen = []

    def features(images):
        seen.append(images.shape[1:])
        return images.reshape(len(images), -1, 3).mean(1)  # (B, 3) mean colour

    r = make_fid(features=features).run(NoiseSampler(h=24, w=32), data=tmp_path / "ref", progress=False)
    assert set(seen) == {(24, 32, 3)} and r.metrics["complete"] and r.metrics["n_images"] == 6

    def read(path):  # the largest centred 3:4 (h:w) box, PIL bicubic to 24 x 32
        im = Image.open(path)
        w, h = im.size
        bw, bh = min(w, round(h * 32 / 24)), min(h, round(w * 24 / 32))
        box = ((w - bw) // 2, (h - bh) // 2, (w - bw) // 2 + bw, (h - bh) // 2 + bh)
        return np.asarray(im.crop(box).resize((32, 24), Image.BICUBIC))

    ref = np.stack([features(read(tmp_path / "ref" / f"{i}.png")[None])[0] for i in range(6)])
    gen = features(r.images)
    s1, s2 = np.cov(gen, rowvar=False), np.cov(ref, rowvar=False)
    want = ((gen.mean(0) - ref.mean(0)) ** 2).sum() + np.trace(s1 + s2 - 2 * np.real(linalg.sqrtm(s1 @ s2)))
    assert r.metrics["fid"] == pytest.approx(want, rel=1e-6)


# -- HPSv2 --------------------------------------------------------------------------------------------------

STYLES = ("anime", "concept-art", "paintings", "photo")


def _hps_prompts(folder: Path, n: int) -> Path:
    folder.mkdir()
    for s in STYLES:
        (folder / f"{s}.json").write_text(json.dumps([f"{s} {i}" for i in range(n)]))
    return folder


def _hps_score(images, prompts):
    """A stand-in for HPS: the prompt's number, scaled, plus a little of the image."""
    return [int(p.split()[-1]) / 1000 + float(np.asarray(im).mean()) / 1e5 for im, p in zip(images, prompts)]


def test_hpsv2_scores_styles_in_80_prompt_chunks(tmp_path):
    from slimdit.metrics.external.hpsv2 import make_hpsv2

    data = _hps_prompts(tmp_path / "hps", 200)  # chunks of 80, 80, 40
    sampler = NoiseSampler()
    r = make_hpsv2(scorer=_hps_score).run(sampler, images_per_prompt=2, data=data, progress=False)
    assert sampler.prompts[:4] == ["anime 0", "anime 0", "concept-art 0", "concept-art 0"]  # styles interleaved
    per_image = np.array(_hps_score([Image.fromarray(im) for im in r.images], [p.text for p in r.prompts]))
    by_prompt = per_image.reshape(-1, 2).mean(1)
    for k, s in enumerate(STYLES):
        mine = by_prompt[k::4]  # this style's prompts, in order
        chunk_means = [100 * mine[i:i + 80].mean() for i in range(0, 200, 80)]
        assert r.metrics[s] == pytest.approx(np.mean(chunk_means)) and r.metrics[s] != pytest.approx(100 * mine.mean())
        assert r.metrics[f"{s}_std"] == pytest.approx(np.std(chunk_means))
    assert r.metrics["overall"] == pytest.approx(np.mean([r.metrics[s] for s in STYLES]))
    assert r.metrics["n_prompts"] == 800 and r.metrics["n_images"] == 1600 and not r.metrics["complete"]


def test_hpsv2_full_protocol_is_4_styles_x_800_prompts_one_image_each(tmp_path):
    from slimdit.metrics.external.hpsv2 import make_hpsv2

    bench = make_hpsv2(scorer=_hps_score)
    data = _hps_prompts(tmp_path / "hps", 800)
    assert [p.text for p in bench.check(6, data=data)] == ["anime 0", "concept-art 0", "paintings 0", "photo 0",
                                                          "anime 1", "concept-art 1"]
    r = bench.run(NoiseSampler(2, 2), data=data, progress=False)
    assert r.metrics["complete"] and r.metrics["n_images"] == 3200
    assert r.metrics["protocol"] == "3200 prompts x 1 images"


# -- ImageReward --------------------------------------------------------------------------------------------

def test_imagereward_is_the_mean_over_prompts_of_each_prompts_mean_reward(tmp_path):
    from slimdit.metrics.external.imagereward import make_imagereward

    path = tmp_path / "benchmark-prompts.json"
    path.write_text(json.dumps([{"id": f"{i:06d}", "prompt": f"prompt {i}"} for i in range(100)]))
    got = []

    def reward(images, prompts):
        got.append(len(images))
        return [float(np.asarray(im)[0, 0, 0]) for im in images]

    sampler = NoiseSampler()
    bench = make_imagereward(scorer=reward)
    r = bench.run(sampler, data=path, progress=False)
    assert sampler.prompts[:11] == ["prompt 0"] * 10 + ["prompt 1"] and got == [1000]
    assert r.metrics["overall"] == pytest.approx(r.images[:, 0, 0, 0].reshape(100, 10).mean(1).mean())
    assert r.metrics["complete"] and r.metrics["protocol"] == "100 prompts x 10 images"
    assert not bench.run(NoiseSampler(), limit=3, data=tmp_path, progress=False).metrics["complete"]


# -- GenEval ------------------------------------------------------------------------------------------------

TAG_COUNTS = {"single_object": 4, "two_object": 2, "counting": 1, "colors": 2, "position": 2, "color_attr": 1}


def _geneval_repo(root: Path, counts: dict[str, int] = TAG_COUNTS, texts: list[str] | None = None) -> Path:
    (root / "prompts").mkdir(parents=True)
    rows = [{"tag": t, "include": [{"class": "cat", "count": 1}], "prompt": f"a photo of {t} {i}"}
            for t, n in counts.items() for i in range(n)]
    for row, text in zip(rows, texts or []):
        row["prompt"] = text
    (root / "prompts" / "evaluation_metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def _bright(images: np.ndarray) -> np.ndarray:
    return images.reshape(len(images), -1).mean(1) > 127.5


def test_geneval_overall_is_the_mean_over_tags_not_over_images(tmp_path):
    from slimdit.metrics.external.geneval import make_geneval

    repo = _geneval_repo(tmp_path / "geneval")
    asked = []

    def judge(rows, images, k):
        asked.append([r["prompt"] for r in rows])
        return _bright(images)

    r = make_geneval(judge=judge).run(NoiseSampler(1, 1), data=repo, progress=False)
    assert asked[0][:6] == [f"a photo of {t} 0" for t in TAG_COUNTS]  # tags interleaved, rows in image order
    assert [p.text for p in r.prompts[::4]] == asked[0] and len(r.images) == 12 * 4
    ok = _bright(r.images)
    tags = [p.group for p in r.prompts]
    by_tag = {t: ok[[g == t for g in tags]].mean() for t in TAG_COUNTS}
    assert {t: r.metrics[t] for t in TAG_COUNTS} == pytest.approx(by_tag)
    assert r.metrics["overall"] == pytest.approx(np.mean(list(by_tag.values())))
    assert r.metrics["overall"] != pytest.approx(ok.mean())  # unequal tag sizes: the two means differ
    assert r.metrics["correct_prompts"] == pytest.approx(ok.reshape(12, 4).any(1).mean())
    assert (r.correct == ok).all() and not r.metrics["complete"]


def test_geneval_full_protocol_is_553_prompts_x_4_images(tmp_path):
    from slimdit.metrics.external.geneval import make_geneval

    counts = {"single_object": 80, "two_object": 99, "counting": 80, "colors": 94, "position": 100, "color_attr": 100}
    repo = _geneval_repo(tmp_path / "geneval", counts)
    r = make_geneval(judge=lambda rows, images, k: _bright(images)).run(NoiseSampler(1, 1), data=repo, progress=False)
    assert sum(counts.values()) == 553 and r.metrics["complete"] and r.metrics["n_images"] == 2212
    with pytest.raises(ValueError, match="--limit must be between 1 and 553"):
        make_geneval(judge=lambda *a: None).check(554, data=repo)


def test_geneval_evaluator_reads_and_writes_genevals_layout(tmp_path):
    """GenEval's evaluator stood in by a script that reads its documented layout and writes results.jsonl."""
    from slimdit.metrics.external.geneval import GenEvalEvaluator

    repo = _geneval_repo(tmp_path / "geneval")
    (repo / "evaluation").mkdir()
    (repo / "evaluation" / "evaluate_images.py").write_text(
        "import json, os, sys\nimport numpy as np\nfrom PIL import Image\n"
        "imagedir, outfile = sys.argv[1], sys.argv[sys.argv.index('--outfile') + 1]\nrows = []\n"
        "for sub in sorted(os.listdir(imagedir)):\n"
        "    meta = json.load(open(os.path.join(imagedir, sub, 'metadata.jsonl')))\n"
        "    for name in os.listdir(os.path.join(imagedir, sub, 'samples')):\n"
        "        path = os.path.join(imagedir, sub, 'samples', name)\n"
        "        rows.append({'filename': path, 'tag': meta['tag'], 'prompt': meta['prompt'],\n"
        "                     'correct': bool(np.asarray(Image.open(path)).mean() > 127.5)})\n"
        "open(outfile, 'w').write(''.join(json.dumps(r) + '\\n' for r in rows[::-1]))\n")
    rows = [{"tag": "colors", "prompt": f"p{i}"} for i in range(3)]
    images = np.random.default_rng(0).integers(0, 256, (6, 5, 5, 3), dtype=np.uint8)
    got = GenEvalEvaluator(repo, tmp_path, sys.executable)(rows, images, 2)
    assert (got == _bright(images)).all()


def test_geneval_names_each_missing_piece_of_its_evaluator(tmp_path, monkeypatch):
    from slimdit.metrics.external.geneval import make_geneval

    bench = make_geneval()
    with pytest.raises(FileNotFoundError, match="djghosh13/geneval"):
        bench.check(None, data=tmp_path / "nowhere")
    repo = _geneval_repo(tmp_path / "geneval")
    with pytest.raises(FileNotFoundError, match="needs the checkout"):
        bench.check(None, data=repo)
    (repo / "evaluation").mkdir()
    (repo / "evaluation" / "evaluate_images.py").write_text("")
    monkeypatch.delenv("SLIMDIT_GENEVAL_DETECTOR", raising=False)
    with pytest.raises(FileNotFoundError, match=r"download_models\.sh DIR.*SLIMDIT_GENEVAL_DETECTOR"):
        bench.check(None, data=repo)
    monkeypatch.setenv("SLIMDIT_GENEVAL_DETECTOR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco.pth"):
        bench.check(None, data=repo)
    if importlib.util.find_spec("mmdet") is None:
        (tmp_path / "mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco.pth").write_bytes(b"")
        monkeypatch.setenv("SLIMDIT_GENEVAL_PYTHON", sys.executable)
        with pytest.raises(MissingPackage, match=r"mmdet 2\.x.*SLIMDIT_GENEVAL_PYTHON"):
            bench.check(None, data=repo)


# -- DPG-Bench ----------------------------------------------------------------------------------------------

# (item, proposition id, dependency, tuple, question: "... [tiles that answer yes]")
DPG_ROWS = [
    ("a", 1, "0", "entity - whole (cat)", "is there a cat? [0,1,2,3]"),  # data row 0: the reference skips it,
    ("a", 2, "1", "attribute - color (cat, black)", "is the cat black? [0,1,2,3]"),  # so item a fails (no 1)
    ("b", 1, "0", "entity - whole (dog)", "is there a dog? [0,1,2,3]"),
    ("b", 2, "1", "attribute - color (dog, red)", "is the dog red? [0,1]"),
    ("b", 3, "1,2", "relation - spatial (dog, ball, left)", "is the dog left of the ball? [0,1,2,3]"),
    ("b", 4, "0", "global (style)", "is it a painting? [3]"),
    ("c", 1, "0", "entity - whole (fox)", "is there a fox? []"),
    ("c", 2, "1", "attribute - color (fox, blue)", "is the fox blue? [0,1,2,3]"),
]


def _dpg_folder(root: Path) -> Path:
    (root / "prompts").mkdir(parents=True)
    for item in "abc":
        (root / "prompts" / f"{item}.txt").write_text(f"a dense prompt {item}\n")
    with open(root / "dpg_bench.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["item_id", "text", "keywords", "proposition_id", "dependency", "category_broad",
                    "category_detailed", "tuple", "question_natural_language"])
        for item, qid, dep, tup, q in DPG_ROWS:
            w.writerow([item, f"a dense prompt {item}", "", qid, dep, tup.split(" ")[0], "", tup, q])
    return root


class TileSampler:
    """A stand-in model: the image with seed s is flat grey (s % 4) * 60, so tile j of a prompt is grey j * 60."""

    def generate(self, prompts, seeds, progress=True):
        return np.stack([np.full((4, 4, 3), (s % 4) * 60, dtype=np.uint8) for s in seeds])


def _tile_vqa(image, question):
    """A stand-in VQA: 'yes' when the tile (known by its grey) is listed in the question's brackets."""
    tile = int(round(np.asarray(image).mean() / 60))
    return "yes" if tile in json.loads(question[question.index("["):]) else "no"


def test_dpg_bench_tiles_2x2_zeroes_dependents_and_averages_as_the_reference(tmp_path):
    from slimdit.metrics.external.dpg import make_dpg

    r = make_dpg(vqa=_tile_vqa).run(TileSampler(), data=_dpg_folder(tmp_path / "dpg"), progress=False)
    # b: tiles score 3/4, 3/4, 1/4 (red fails, so the relation is zeroed), 2/4; c: the fox is never seen, so all 0
    assert r.metrics["overall"] == pytest.approx(100 * np.mean([np.mean([0.75, 0.75, 0.25, 0.5]), 0.0]))
    assert r.metrics["n_failed"] == 1 and r.metrics["failed"] == ["a"]
    # categories: raw answers of the last tile (3): b entity 1, colour 0, relation 1, global 1; c entity 0, colour 1
    assert {k: r.metrics[k] for k in ("entity", "attribute", "relation", "global")} == pytest.approx(
        {"entity": 50.0, "attribute": 50.0, "relation": 100.0, "global": 100.0})
    assert r.metrics["categories"] == pytest.approx(
        {"attribute - color": 50.0, "entity - whole": 50.0, "global": 100.0, "relation - spatial": 100.0})
    assert r.correct.tolist() == [False] * 12 and len(r.images) == 12 and not r.metrics["complete"]


def test_dpg_bench_grid_is_left_to_right_top_to_bottom():
    from slimdit.metrics.external.dpg import tile, tile_boxes

    ims = np.random.default_rng(0).integers(0, 256, (4, 3, 5, 3), dtype=np.uint8)
    grid = Image.fromarray(tile(ims))
    assert grid.size == (10, 6)
    assert all((np.asarray(grid.crop(b)) == ims[j]).all() for j, b in enumerate(tile_boxes(5, 3, 4)))
    assert (tile(ims[:1])[3:, 5:] == 0).all()


def test_dpg_bench_checks_its_images_per_prompt_and_limit(tmp_path):
    from slimdit.metrics.external.dpg import make_dpg

    data, bench = _dpg_folder(tmp_path / "dpg"), make_dpg(vqa=_tile_vqa)
    with pytest.raises(ValueError, match="--images-per-prompt for dpg-bench must be 1 to 4, got 5"):
        bench.check(None, data=data, images_per_prompt=5)
    with pytest.raises(ValueError, match="--limit must be between 1 and 3"):
        bench.check(4, data=data)
    r = bench.run(TileSampler(), limit=2, images_per_prompt=1, data=data, progress=False)
    assert r.metrics["overall"] == pytest.approx(75.0) and r.metrics["n_prompts"] == 2  # b's one image: 3 of 4


# -- missing packages and weights: named, with how to get them, before any model ----------------------------

@absent("hpsv2")
def test_hpsv2_without_its_package_says_what_to_install(tmp_path):
    from slimdit.metrics.external.hpsv2 import make_hpsv2

    with pytest.raises(MissingPackage, match=r"pip install hpsv2"):
        make_hpsv2().check(None, data=_hps_prompts(tmp_path / "hps", 3))


@absent("ImageReward")
def test_imagereward_without_its_package_says_what_to_install(tmp_path):
    from slimdit.metrics.external.imagereward import make_imagereward

    (tmp_path / "benchmark-prompts.json").write_text(json.dumps([{"id": "1", "prompt": "a cat"}]))
    with pytest.raises(MissingPackage, match=r"pip install image-reward"):
        make_imagereward().check(None, data=tmp_path)


@absent("modelscope")
def test_dpg_bench_without_its_package_says_what_to_install(tmp_path):
    from slimdit.metrics.external.dpg import make_dpg

    with pytest.raises(MissingPackage, match=r"pip install modelscope"):
        make_dpg().check(None, data=_dpg_folder(tmp_path / "dpg"))


@absent("torch_fidelity")
def test_fid_without_its_package_says_what_to_install(tmp_path):
    from slimdit.metrics.external.fid import make_fid

    _reference_set(tmp_path / "ref", [(8, 8)])
    with pytest.raises(MissingPackage, match=r"pip install torch-fidelity"):
        make_fid().check(None, data=tmp_path / "ref")


def test_missing_weights_say_where_they_go(tmp_path, monkeypatch):
    from slimdit.metrics.external import cmmd, dpg, fid, hpsv2, imagereward

    monkeypatch.setenv("SLIMDIT_FID_INCEPTION", str(tmp_path / "no.pth"))
    with pytest.raises(FileNotFoundError, match=r"no\.pth \(from \$SLIMDIT_FID_INCEPTION\).*torch-fidelity/releases"):
        fid.inception_weights()
    monkeypatch.delenv("SLIMDIT_HPSV2_CHECKPOINT", raising=False)
    monkeypatch.setenv("HPS_ROOT", str(tmp_path))
    if hpsv2.hf_cached("xswu/HPSv2", hpsv2.CHECKPOINT) is None:
        with pytest.raises(FileNotFoundError, match=r"huggingface-cli download xswu/HPSv2 HPS_v2\.1_compressed\.pt"):
            hpsv2.checkpoint()
    monkeypatch.setenv("SLIMDIT_IMAGEREWARD_ROOT", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"ImageReward\.pt, med_config\.json missing"):
        imagereward.weights_root()
    monkeypatch.setenv("SLIMDIT_DPG_VQA", str(tmp_path / "mplug"))
    with pytest.raises(FileNotFoundError, match=r"snapshot_download\('damo/mplug_visual-question-answering"):
        dpg.vqa_model()
    monkeypatch.setenv("SLIMDIT_CMMD_CLIP", "no-such-org/no-such-clip")
    with pytest.raises(FileNotFoundError, match=r"huggingface-cli download openai/clip-vit-large-patch14-336"):
        cmmd.clip_source()


def test_slimdit_eval_runs_an_external_benchmark_with_its_own_protocol(tmp_path, monkeypatch):
    from slimdit import registry
    from slimdit.metrics.evaluate import evaluate_model
    from slimdit.metrics.external.geneval import make_geneval

    monkeypatch.setitem(registry.BENCHMARKS, "geneval-stand-in",
                        make_geneval(judge=lambda rows, images, k: _bright(images)))
    from slimdit.worlds.shapes.prompts import eval_prompts

    repo = _geneval_repo(tmp_path / "geneval", texts=[p.text for p in eval_prompts()[:12]])  # prompts it can draw
    # the embedder is never loaded (an unknown one would fail); images per prompt are GenEval's 4
    r = evaluate_model("shapes-oracle", "geneval-stand-in", out=tmp_path / "m.json", limit=6,
                       embedder="no-such-embedder", benchmark_data=repo)
    written = json.loads((tmp_path / "m.json").read_text())
    assert written["images_per_prompt"] == 4 and written["n_prompts"] == 6 and len(r.images) == 24
    assert set(TAG_COUNTS) <= set(written) and written["benchmark"] == "geneval-stand-in"
    with pytest.raises(ValueError, match="'shapes-geneval' takes no --benchmark-data"):
        evaluate_model("shapes-oracle", "shapes-geneval", benchmark_data=repo)
