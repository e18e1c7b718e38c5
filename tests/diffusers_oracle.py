"""Tiny Stable Diffusion pieces built here (a UNet and a CLIP text encoder, from configs: no download), saved as a
diffusers pipeline directory for ``--base``, and diffusers' own loaders run on them: what ``load_lora_weights``
really injects and the ΔW it really applies (merged, float64): the public ``load_lora_weights`` of the SD / SDXL
loader mixin, run on a stand-in pipeline holding the two models. For ``tests/test_applied.py`` and
``tests/test_fit_image.py``; imported after ``pytest.importorskip("diffusers")``."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

UNET_NAME, TE_NAME = "unet", "text_encoder"


def tiny_unet(seed: int = 0):
    import diffusers

    torch.manual_seed(seed)
    return diffusers.UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=4, norm_num_groups=4)


def tiny_te(seed: int = 1):
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = CLIPTextConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                         max_position_embeddings=16, projection_dim=8, eos_token_id=2, bos_token_id=1, pad_token_id=0)
    torch.manual_seed(seed)
    return CLIPTextModel(cfg)


def save_pipeline(d: Path, unet, te, class_name: str = "StableDiffusionPipeline") -> Path:
    """A diffusers pipeline directory with the two components' weights (what ``--base`` reads)."""
    d.mkdir(parents=True, exist_ok=True)
    unet.save_pretrained(str(d / UNET_NAME))
    te.save_pretrained(str(d / TE_NAME))
    (d / "model_index.json").write_text(json.dumps({"_class_name": class_name, UNET_NAME: ["diffusers", "x"],
                                                    TE_NAME: ["transformers", "CLIPTextModel"]}))
    return d


def lora_paths(model) -> list[str]:
    """Every Linear/Conv2d module path of a model (what a LoRA can adapt)."""
    return [n for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]


def kohya_name(comp: str, path: str) -> str:
    """sd-scripts' name: ``lora_unet_`` / ``lora_te_`` + the module path with '_' (text encoders under
    ``text_model``, as the checkpoints of transformers < 5 name them)."""
    if comp == TE_NAME:
        return "lora_te_" + ("text_model." + path.removeprefix("text_model.")).replace(".", "_")
    return "lora_unet_" + path.replace(".", "_")


def factors(model, path: str, r: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(down (r, in[, kh, kw]), up (out, r[, 1, 1])) for the module at ``path``."""
    w = model.get_submodule(path).weight
    if w.ndim == 4:
        return torch.randn(r, w.shape[1], *w.shape[2:], generator=g), torch.randn(w.shape[0], r, 1, 1, generator=g)
    return torch.randn(r, w.shape[1], generator=g), torch.randn(w.shape[0], r, generator=g)


def _pipeline(mixin: type, unet, te):
    """The smallest object diffusers' ``load_lora_weights`` runs on: the mixin with the components it loads."""

    class Tiny(mixin):  # type: ignore[misc, valid-type]
        hf_device_map = None
        text_encoder_2 = None

        def __init__(self) -> None:
            self.unet, self.text_encoder = unet, te

        @property
        def components(self) -> dict:
            return {UNET_NAME: self.unet, TE_NAME: self.text_encoder}

    return Tiny()


def real_load(source: Path, unet, te, xl: bool = False) -> dict[str, torch.Tensor]:
    """``source`` through diffusers' own ``load_lora_weights`` (``StableDiffusionLoraLoaderMixin``, or SDXL's with
    ``xl``) into copies of ``unet`` and ``te``: {"unet.<path>" / "text_encoder.<path>": the ΔW applied (merged
    W − W, float64, 2-D)} for every module PEFT injected a layer into. Raises what diffusers raises."""
    from diffusers.loaders import StableDiffusionLoraLoaderMixin, StableDiffusionXLLoraLoaderMixin
    from peft.tuners.tuners_utils import BaseTunerLayer

    pipe = _pipeline(StableDiffusionXLLoraLoaderMixin if xl else StableDiffusionLoraLoaderMixin,
                     copy.deepcopy(unet), copy.deepcopy(te))
    pipe.load_lora_weights(str(source), adapter_name="x")
    base = {UNET_NAME: unet, TE_NAME: te}
    out = {}
    for comp, model in ((UNET_NAME, pipe.unet), (TE_NAME, pipe.text_encoder)):
        for name, mod in model.named_modules():
            if isinstance(mod, BaseTunerLayer):
                mod.merge()
                w = mod.get_base_layer().weight.detach().double()
                w0 = base[comp].get_submodule(name).weight.detach().double()
                out[f"{comp}.{name}"] = (w - w0).reshape(w.shape[0], -1)
    return out
