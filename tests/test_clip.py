"""ClipModule end to end from the composed config, its export, the zero-shot metrics and the CLIP helpers."""

from __future__ import annotations

import math

import open_clip
import pytest
import torch
from conftest import CONF, compose_config
from hydra import compose, initialize_config_dir

from clipdiff.errors import ClipdiffError
from clipdiff.models.clip_module import ClipModule
from clipdiff.models.components.clip import create_clip, load_clip
from clipdiff.models.components.optim import param_groups, warmup_cosine
from clipdiff.models.export import save_export
from clipdiff.models.metrics.zeroshot import ZeroShotMetrics, evaluate
from clipdiff.train import train

VOCAB = ["a blue car", "a red car", "a white and red car", "a white car", "a white jeep/bus"]
# clip_run trains once: on one xdist worker for the whole module (--dist loadgroup)
pytestmark = pytest.mark.xdist_group("test_clip")


def compose_train(overrides: list[str]):
    return compose_config("train", overrides)


@pytest.fixture(scope="module")
def clip_run(tmp_path_factory):
    """One short run (2 epochs × 2 steps) on flat-coloured squares, shared by the tests below."""
    from conftest import write_srn

    tmp = tmp_path_factory.mktemp("clip")
    root = write_srn(tmp / "flat", {
        "cars_train": {"a1": "a red car", "a2": "a blue car", "a3": "a white car", "a4": "a white car",
                       "a5": "a green jeep/bus", "a6": "a red car"},
        "cars_val": {"b1": "a red car", "b2": "a white car"},
        "cars_test": {"c1": "a blue car"},
    })
    run_dir = tmp / "run"
    cfg = compose_train([
        "model=clip", f"data.root={root}", "data.cache=false", "data.batch_size=4", "data.progress=false",
        "trainer.max_epochs=2", "trainer.limit_train_batches=2", "trainer.enable_progress_bar=false",
        "callbacks=early_stopping", "logger=csv", f"paths.run_dir={run_dir}",
    ])
    metrics, objects = train(cfg)
    return run_dir, metrics, objects


def test_run_from_composed_config_writes_checkpoint_export_metrics_and_confusion(clip_run):
    run_dir, metrics, objects = clip_run
    assert (run_dir / "export.pt").is_file()
    assert list((run_dir / "checkpoints").glob("best-*.ckpt"))
    for key in ("val/acc_caption", "val/acc_caption_macro", "val/acc_colour", "val/acc_type", "val/r1", "val/r5",
                "train/loss"):
        assert key in metrics and math.isfinite(metrics[key]), key
    assert 0.0 <= metrics["val/acc_caption"] <= 1.0
    assert (run_dir / "zeroshot" / "val_epoch001_confusion.png").stat().st_size > 1000
    assert "a red car" in (run_dir / "zeroshot" / "val_epoch001_per_class.tsv").read_text()
    assert "val/acc_caption" in (run_dir / "csv" / "metrics.csv").read_text()
    assert objects["model"].clip.vocabulary == objects["datamodule"].vocab.to_list()


def test_export_loads_without_lightning_and_gives_identical_logits(clip_run):
    run_dir, _, objects = clip_run
    module: ClipModule = objects["model"].eval()
    clf = load_clip(run_dir / "export.pt")
    assert not clf.training and not any(p.requires_grad for p in clf.parameters())
    assert clf.vocabulary == module.clip.vocabulary and clf.image_size == 32
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = module(x)
    assert torch.equal(clf.logits(x), expected)
    assert torch.allclose(clf.encode_image(x).norm(dim=-1), torch.ones(3))
    # a 64 px batch is resized to the model's 32 px input
    assert clf.logits(torch.rand(2, 3, 64, 64)).shape == (2, len(clf.vocabulary))
    # the Lightning checkpoint reloads to the same weights (pretrained is not re-read)
    best = next((run_dir / "checkpoints").glob("best-*.ckpt"))
    reloaded = ClipModule.load_from_checkpoint(best, map_location="cpu", weights_only=False).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(x), expected)


def test_wrong_kind_of_checkpoint_is_one_clear_error(clip_run, tmp_path):
    run_dir, _, _ = clip_run
    ddpm = save_export(tmp_path / "ddpm.pt", "ddpm", config={}, state_dict={})
    with pytest.raises(ClipdiffError, match="holds a ddpm model, but a clip model"):
        load_clip(ddpm, key="guidance.clip")
    ckpt = next((run_dir / "checkpoints").glob("*.ckpt"))
    with pytest.raises(ClipdiffError, match="Lightning checkpoint"):
        load_clip(ckpt)
    with pytest.raises(ClipdiffError, match="guidance.clip=.*does not exist"):
        load_clip(tmp_path / "nothing.pt", key="guidance.clip")


def test_pretrained_missing_names_the_key_and_a_local_file_is_loaded(tmp_path):
    with pytest.raises(ClipdiffError, match=r"model\.pretrained=.*missing\.pt is not a file"):
        ClipModule(VOCAB, pretrained=str(tmp_path / "missing.pt"))
    with pytest.raises(ClipdiffError, match=r"model\.pretrained=openai"):
        create_clip("clipdiff-tiny-32", "openai")
    with pytest.raises(ClipdiffError, match="model.model_name=no-such-net"):
        create_clip("no-such-net")
    source, _, _ = create_clip("clipdiff-tiny-32")
    with torch.no_grad():
        source.logit_scale.fill_(1.234)
    torch.save(source.state_dict(), tmp_path / "weights.pt")
    module = ClipModule(VOCAB, pretrained=str(tmp_path / "weights.pt"))
    for (name, a), b in zip(source.state_dict().items(), module.clip.model.state_dict().values()):
        assert torch.equal(a, b), name


def test_vocabulary_is_tokenised_once_with_open_clip():
    module = ClipModule(VOCAB, model_name="clipdiff-tiny-32")
    tokens = open_clip.get_tokenizer("clipdiff-tiny-32")(VOCAB)
    assert torch.equal(module.clip.tokens, tokens) and tokens.shape[1] == 16
    clf = module.clip
    x = torch.rand(1, 3, 32, 32)
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
    assert torch.allclose(clf.preprocess(x), (x - mean) / std)
    with pytest.raises(ClipdiffError, match="not in this CLIP's vocabulary"):
        clf.caption_id("a purple car")


def test_zero_shot_metrics_on_hand_made_embeddings():
    # one-hot caption embeddings; each image is a noisy copy of the caption it is predicted as
    text = torch.eye(len(VOCAB))
    target = torch.tensor([1, 1, 3, 3, 2, 4])
    predicted = torch.tensor([1, 3, 3, 0, 1, 4])  # right, wrong caption, right, wrong, wrong, right
    second = torch.tensor([0, 1, 0, 3, 2, 0])  # the runner-up caption of each image
    weight = torch.tensor([1.0, 0.9, 0.8, 0.7, 0.95, 0.6])[:, None]  # no ties between images
    images = weight * text[predicted] + 0.5 * text[second]
    logits = 10 * images @ text.T
    m = ZeroShotMetrics(VOCAB, prefix="val/")
    m.update(logits[:4], target[:4])
    m.update(logits[4:], target[4:])
    out = m.compute()
    assert out["val/acc_caption"] == pytest.approx(3 / 6)
    assert out["val/r1"] == out["val/acc_caption"]
    # per caption: red 1/2, white 1/2, white-and-red 0/1, white jeep/bus 1/1 → macro over the 4 present
    assert out["val/acc_caption_macro"] == pytest.approx((0.5 + 0.5 + 0 + 1) / 4)
    # colours: red→white (wrong), white→blue (wrong), "white and red"→red (wrong): 3/6 right
    assert out["val/acc_colour"] == pytest.approx(3 / 6)
    # types: the jeep/bus is right, every car is predicted a car: 6/6
    assert out["val/acc_type"] == pytest.approx(1.0)
    # top-5 over 5 captions always hits
    assert out["val/r5"] == pytest.approx(1.0)
    # text→image, per caption with images (blue has none): the best image of red (0), white-and-red (4) and
    # jeep/bus (5) is theirs; white car's best is image 1 (a red car), then images 2 and 3 (white cars)
    assert out["val/t2i_r1"] == pytest.approx(3 / 4) and out["val/t2i_r5"] == pytest.approx(1.0)
    ap = {"red": (1 / 1 + 2 / 3) / 2, "white and red": 1.0, "white": (1 / 2 + 2 / 3) / 2, "jeep": 1.0}
    assert out["val/t2i_map"] == pytest.approx(sum(ap.values()) / 4)
    per_class = m.per_class()
    assert per_class["a red car"] == (2, 0.5) and per_class["a blue car"][0] == 0
    assert math.isnan(per_class["a blue car"][1])
    cm = m.confusion()
    assert cm[1, 3] == 1 and cm[2, 1] == 1 and int(cm.sum()) == 6


def test_evaluate_maps_data_vocabulary_ids_onto_the_classifier(clip_run):
    run_dir, _, objects = clip_run
    clf = load_clip(run_dir / "export.pt")
    dm = objects["datamodule"]
    out, _ = evaluate(clf, dm.val_dataloader(), data_vocabulary=dm.vocab.to_list())
    best = float(objects["trainer"].checkpoint_callback.best_model_score)  # the export is the best epoch's
    assert out["val/acc_caption"] == pytest.approx(best)
    shuffled = list(reversed(clf.vocabulary))
    remapped = [{"image": b["image"], "caption": len(shuffled) - 1 - b["caption"]} for b in dm.val_dataloader()]
    out2, _ = evaluate(clf, remapped, data_vocabulary=shuffled)
    assert out2 == out


def test_optimiser_groups_and_schedule():
    model, _, _ = create_clip("clipdiff-tiny-32")
    decay, rest = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    rest_names = {names[id(p)] for p in rest["params"]}
    assert "logit_scale" in rest_names and "ln_final.weight" in rest_names and "ln_final.bias" in rest_names
    assert "visual.conv1.weight" in {names[id(p)] for p in decay["params"]}
    assert decay["weight_decay"] == 0.1 and rest["weight_decay"] == 0.0
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = warmup_cosine(opt, total_steps=100, warmup=0.1, min_lr_ratio=0.0)
    lrs = []
    for _ in range(100):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] < lrs[5] < lrs[10] == pytest.approx(1.0)
    assert lrs[10] > lrs[50] > lrs[99] and lrs[99] < 0.01


def test_frozen_text_tower_is_left_out_of_the_optimiser():
    module = ClipModule(VOCAB, freeze_text=True)
    model = module.clip.model
    assert not model.token_embedding.weight.requires_grad and not model.text_projection.requires_grad
    assert model.visual.conv1.weight.requires_grad and model.logit_scale.requires_grad
    trained = {id(p) for g in param_groups(model, 0.1) for p in g["params"]}
    assert id(model.token_embedding.weight) not in trained and id(model.visual.conv1.weight) in trained


def test_vitb32_preset_inherits_the_clip_config():
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("train", overrides=["model=clip_vitb32", "callbacks=early_stopping"])
    assert cfg.model._target_ == "clipdiff.models.clip_module.ClipModule"
    assert cfg.model.model_name == "ViT-B-32" and cfg.model.optimizer.lr == 1e-5
    assert cfg.model.monitor.metric == "val/acc_caption" and cfg.model.scheduler is not None
    assert cfg.callbacks.early_stopping.monitor == "val/acc_caption"
    assert cfg.callbacks.model_checkpoint.mode == "max"
    assert open_clip.get_model_config("ViT-B-32")["vision_cfg"]["image_size"] == 224
