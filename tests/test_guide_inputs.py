"""What the guides and the judge read: resized images as if pre-resized, free-text prompts as their normalised
text embedding; and the gradient clean-up leaves a gradient under the clamp exactly alone."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from tiny_guides import LINEAR, SIZE, tiny_clip, tiny_noisy_clip

from clipdiff.diffusion.guidance import CleanClipGuide, NoisyClipGuide, clean_grad
from clipdiff.diffusion.schedule import train_scheduler
from clipdiff.models.components.judge import Judge

VOCAB = ["a blue car", "a red car", "a red jeep/bus", "a white van"]

PROMPT = "a purple truck"


def images(size: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(3, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_clip_and_judge_read_other_sizes_as_the_same_images_pre_resized():
    """Larger images are resized with antialiased bilinear interpolation, smaller ones with plain bilinear."""
    clf = tiny_clip()
    torch.manual_seed(0)
    tiny = {"widths": [4], "blocks": [1], "strides": [1]}
    judge = Judge(VOCAB, image_size=SIZE, type_net=tiny, colour_net=tiny).eval()

    def read(x: torch.Tensor) -> torch.Tensor:  # both of the judge's nets: the grey type net and the colour net
        return torch.cat([judge.type_net(x), judge.colour_net(x)], 1)

    big, small = images(4 * SIZE), images(SIZE // 2, 1)
    down = F.interpolate(big, size=(SIZE, SIZE), mode="bilinear", align_corners=False, antialias=True)
    up = F.interpolate(small, size=(SIZE, SIZE), mode="bilinear", align_corners=False, antialias=False)
    with torch.no_grad():
        torch.testing.assert_close(clf.logits(big), clf.logits(down))
        torch.testing.assert_close(clf.logits(small), clf.logits(up))
        torch.testing.assert_close(read(big), read(down))
        # the resizing matters: another interpolation reads differently
        nearest = F.interpolate(big, size=(SIZE, SIZE), mode="nearest")
        assert not torch.allclose(clf.logits(big), clf.logits(nearest), atol=1e-3)
        assert not torch.allclose(read(big), read(nearest), atol=1e-3)


def test_free_text_prompts_guide_with_their_normalised_text_embedding():
    clf = tiny_clip()
    guide = CleanClipGuide(clf, train_scheduler(LINEAR).alphas_cumprod, [PROMPT])
    with torch.no_grad():
        expected = F.normalize(clf.model.encode_text(clf.tokenizer([PROMPT])), dim=-1)[0]
        x = images(SIZE)
        image = F.normalize(clf.model.encode_image(clf.preprocess(x)), dim=-1)
        logits = guide.image_logits(x)
    assert guide.captions[-1] == PROMPT and guide.text.shape[0] == len(clf.vocabulary) + 1
    torch.testing.assert_close(guide.text[-1], expected)
    torch.testing.assert_close(guide.text[:-1], clf.get_text_features())
    torch.testing.assert_close(logits[:, -1], clf.logit_scale * image @ expected)
    noisy = tiny_noisy_clip()
    ng = NoisyClipGuide(noisy, [PROMPT])
    with torch.no_grad():
        expected = F.normalize(noisy.clip.model.encode_text(noisy.clip.tokenizer([PROMPT])), dim=-1)[0]
    assert ng.captions[-1] == PROMPT
    torch.testing.assert_close(ng.text[-1], expected)


def test_gradient_clean_up_leaves_a_gradient_under_the_clamp_exactly_alone():
    g = torch.randn(3, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    g[0] *= 100.0  # far over the clamp
    g[1] *= 0.01 / g[1].pow(2).mean().sqrt()  # RMS 0.01: under the clamp
    g[2] *= 0.02 / g[2].pow(2).mean().sqrt()
    g[2, 0, 0, 0], g[2, 1, 1, 1], g[2, 2, 2, 2] = float("nan"), float("inf"), float("-inf")
    out = clean_grad(g, 0.05)
    assert torch.equal(out[1], g[1])  # bit for bit
    expected = g[2].clone()
    expected[0, 0, 0] = expected[1, 1, 1] = expected[2, 2, 2] = 0.0
    assert torch.equal(out[2], expected)
    assert abs(out[0].pow(2).mean().sqrt().item() - 0.05) < 1e-6
    torch.testing.assert_close(out[0] / out[0].norm(), g[0] / g[0].norm())  # clamped along its own direction
    assert torch.equal(clean_grad(g[1:2], None), g[1:2])
