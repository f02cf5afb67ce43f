"""``clipdiff.evaluate``'s numbers against answers known in the test: a judge whose decisions are a function of the
image that the test controls, the guide's own argmax, and FD against the closed-form Fréchet distance."""

from __future__ import annotations

import csv
import importlib

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F
from conftest import compose_config, write_srn
from tiny_guides import SIZE, VOCAB, clip_export, ddpm_export, noisy_clip_export

from clipdiff import evaluate
from clipdiff.eval import fid
from clipdiff.eval.fid import fd_kid, random_features
from clipdiff.models.components import judge as judge_component
from clipdiff.models.components.judge import Judge
from clipdiff.models.components.noisy_clip import NoisyClipClassifier
from clipdiff.pipelines import guided
from clipdiff.pipelines.guided import GuidedPipeline

CAPTIONS = ["a red car", "a green jeep/bus"]
N = 4


def judged(x01: torch.Tensor) -> torch.Tensor:
    """The rigged judge's decision: a caption id that is a fixed, varied function of the image's mean."""
    return (x01.float().mean((1, 2, 3)) * 997).floor().long() % len(VOCAB)


class RiggedJudge(Judge):
    """The project's Judge (``predict``, ``correct``) with answers the test controls: the colour part and body type
    of the caption ``judged`` names, and a score its threshold never refuses."""

    def forward(self, x01: torch.Tensor) -> dict[str, torch.Tensor]:
        said = judged(x01)
        return {"colour": F.one_hot(self.colour_of[said], len(self.colour_names)).float(),
                "type": F.one_hot(self.type_of[said], len(self.type_names)).float(), "score": torch.zeros(len(said))}


def guide_said(x01: torch.Tensor) -> torch.Tensor:
    """The rigged guide's top caption: another fixed, varied function of the image's mean than the judge's."""
    return (x01.float().mean((1, 2, 3)) * 991).floor().long() % len(VOCAB)


class RiggedNoisyClip(NoisyClipClassifier):
    """The exported noisy CLIP with a large, image-dependent offset on its logits at t = 0, where the guide reads
    finished samples: its top caption for an image x_0 (DDPM scale) is ``guide_said((x_0 + 1) / 2)``, which varies
    from sample to sample (the untrained tiny guide names one caption for every sample, so its argmax could not tell
    a right reading from a wrong one). The sampler never guides at t = 0: the samples are the real guide's."""

    def logits(self, x_t: torch.Tensor, t) -> torch.Tensor:
        out = super().logits(x_t, t)
        at_0 = (torch.as_tensor(t).expand(len(x_t)) == 0).to(out)[:, None]
        return out + at_0 * 100.0 * F.one_hot(guide_said((x_t.detach() + 1) / 2), len(self.vocabulary)).to(out)


def rigged_noisy_clip(path, **kw) -> NoisyClipClassifier:
    model = guided.load_noisy_clip(path, **kw)
    model.__class__ = RiggedNoisyClip
    return model


def parts(caption: str) -> tuple[str, str]:
    """(colour words, body type) of a caption, read independently of the project's Vocabulary."""
    words = caption.split()[1:]
    return " ".join(words[:-1]), words[-1]


def frechet(a: np.ndarray, b: np.ndarray) -> float:
    """The closed-form Fréchet distance between Gaussians fitted to two feature sets (rows: samples)."""
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


@pytest.fixture(scope="module")
def rigged(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("judged")
    root = write_srn(tmp / "flat", {
        "cars_train": {"a1": "a red car", "a2": "a red car", "a3": "a green jeep/bus", "a4": "a green jeep/bus",
                       "a5": "a white car"},
        "cars_val": {"b1": "a red car"},
        "cars_test": {"c1": "a red car"},
    }, views=3)
    mp = pytest.MonkeyPatch()
    judge = RiggedJudge(list(VOCAB), image_size=SIZE, type_net={"widths": [4], "blocks": [1]},
                        colour_net={"widths": [4], "blocks": [1]}).eval()
    judge.calibrate(torch.ones(1, 4), torch.ones(1, 4), quantile=0.0)  # every score 0 ≥ the threshold: none refused
    mp.setattr(judge_component, "load_judge", lambda path, key: judge)  # evaluate imports it when it runs
    mp.setitem(guided.LOADERS, "noisy_clip", rigged_noisy_clip)
    drawn, fds = [], []
    draw = GuidedPipeline.draw

    def spy_draw(self, job, **kw):
        out = draw(self, job, **kw)
        drawn.append((job, out))
        return out

    def spy_fd(fake, real, space, **kw):
        result = fd_kid(fake, real, space, **kw)
        fds.append((fake, real, space, result))
        return result

    # evaluate imports fd_kid from fid when it runs; the realism measures bind their own at import, done here first,
    # so that the spy records evaluate's FD of each row and caption alone
    importlib.import_module("clipdiff.eval.measures")
    mp.setattr(GuidedPipeline, "draw", spy_draw)
    mp.setattr(fid, "fd_kid", spy_fd)
    cfg = compose_config("evaluate", [
        f"ddpm_ckpt={ddpm_export(tmp / 'ddpm.pt')}", f"clip_ckpt={clip_export(tmp / 'clip.pt')}",
        f"noisy_clip_ckpt={noisy_clip_export(tmp / 'noisy.pt')}", "judge_ckpt=rigged", f"data.root={root}",
        "data.cache=false", "sampler.steps=4", f"num_per_caption={N}", "progress=false", "c2st.folds=2", "c2st.repeats=1", "controls.num=4", "controls.overguided_scale=0",
        "real_split=train", "wandb.enabled=false", "methods=[none,noisy_clip]", "scales=[5.0]",
        f"captions={CAPTIONS}".replace("'", '"'), f"paths.run_dir={tmp / 'run'}"])
    try:
        result = evaluate.run(cfg)
    finally:
        mp.undo()
    return result, drawn[1:], fds  # drawn[0]: the timing warm-up


def rows_of(path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def test_accuracy_columns_are_the_judges_known_answers(rigged):
    result, drawn, _ = rigged
    targets = [c for c in CAPTIONS for _ in range(N)]
    rows, summary = rows_of(result["run_dir"] / "results.csv"), rows_of(result["run_dir"] / "summary.csv")
    assert [(job.method, r["method"]) for (job, _), r in zip(drawn, summary)] == [("none", "none"),
                                                                                ("noisy_clip", "noisy_clip")]
    seen = set()
    for job, out in drawn:
        said = [VOCAB[i] for i in judged(out.images).tolist()]
        hits = {"caption": [s == t for s, t in zip(said, targets)],
                "colour": [parts(s)[0] == parts(t)[0] for s, t in zip(said, targets)],
                "type": [parts(s)[1] == parts(t)[1] for s, t in zip(said, targets)]}
        seen |= {tuple(h) for h in hits.values()}
        for k, caption in enumerate(CAPTIONS):
            row = next(r for r in rows if r["method"] == job.method and r["caption"] == caption)
            for part, h in hits.items():
                assert float(row[f"acc_{part}"]) == pytest.approx(np.mean(h[k * N:(k + 1) * N])), (job.method, part)
        pooled = next(r for r in summary if r["method"] == job.method)
        for part, h in hits.items():
            assert float(pooled[f"acc_{part}"]) == pytest.approx(np.mean(h)), (job.method, part)
    assert len(seen) > 2  # the rigged answers are not all alike: the columns had something to get wrong


def test_guide_acc_is_the_guides_own_argmax(rigged):
    result, drawn, _ = rigged
    rows = rows_of(result["run_dir"] / "results.csv")
    _, (job, out) = drawn
    assert all(r["guide_acc"] == "" for r in rows if r["method"] == "none")  # no guide: NaN, written empty
    model = job.cond.guide.model  # the (rigged) noisy CLIP, reading finished samples at t = 0
    assert isinstance(model, RiggedNoisyClip)
    with torch.no_grad():
        own = model.logits(out.images * 2 - 1, torch.zeros(len(out.images), dtype=torch.long)).argmax(1)
    ids = torch.tensor([model.vocabulary.index(c) for c in CAPTIONS for _ in range(N)])
    # the guide's answers vary and are partly right: a wrong reading (another image scale, another model's argmax,
    # a constant) would change some row
    assert len(set(own.tolist())) > 2 and 0 < int((own == ids).sum()) < len(ids), (own, ids)
    for k, caption in enumerate(CAPTIONS):
        row = next(r for r in rows if r["method"] == "noisy_clip" and r["caption"] == caption)
        assert float(row["guide_acc"]) == pytest.approx((own == ids)[k * N:(k + 1) * N].float().mean().item())


def test_fd_column_is_the_closed_form_frechet_distance_of_the_features(rigged):
    result, _, fds = rigged
    rows = rows_of(result["run_dir"] / "results.csv")
    per_caption = [f for f in fds if len(f[0]) == N]
    assert len(per_caption) == len(rows) == 4
    for (fake, real, space, res), row in zip(per_caption, rows):
        expected = frechet(space(fake).double().numpy(), space(real).double().numpy())
        assert res["fd"] == pytest.approx(expected, rel=1e-3, abs=1e-6)
        assert float(row["fd"]) == pytest.approx(expected, rel=1e-3, abs=1e-6)


def test_fd_of_a_set_with_itself_is_zero_and_matches_the_closed_form():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.rand(40, 3, 16, 16, generator=gen), torch.rand(40, 3, 16, 16, generator=gen) * 0.5
    space = random_features(dim=8)
    assert fd_kid(a, a, space)["fd"] == pytest.approx(0.0, abs=1e-6)
    expected = frechet(space(a).double().numpy(), space(b).double().numpy())
    assert expected > 0.01 and fd_kid(a, b, space)["fd"] == pytest.approx(expected, rel=1e-4)
