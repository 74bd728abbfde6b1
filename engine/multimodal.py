"""Images in the engine: which token the processor expands per image, one vision-encoder pass per
newcomer's images (their embeddings replace the placeholders' rows in whichever steps hold them),
and Qwen2-VL's multimodal rotary positions (three axes per token)."""

from __future__ import annotations

import logging
import time

import torch

from .scheduler import Sequence

log = logging.getLogger("chatserve.engine")


def attends_both_ways_within_images(model) -> bool:
    """Whether the model's own forward lets an image's tokens attend to each other both ways rather
    than causally, as each family's transformers code decides it: Gemma 3 (and ShieldGemma 2, built
    on it) always; Gemma 4 when its text config says ``use_bidirectional_attention="vision"`` (its
    larger models); no other family served here."""
    config = model.config
    if config.model_type in ("gemma3", "shieldgemma2"):
        return True
    if config.model_type in ("gemma4", "gemma4_unified"):
        return getattr(config.get_text_config(), "use_bidirectional_attention", None) == "vision"
    return False


def image_runs(positions: list[int]) -> list[tuple[int, int]]:
    """Sorted image-token positions as [start, end) runs of consecutive positions (one per image,
    as the model's own masks group them)."""
    runs: list[tuple[int, int]] = []
    for p in positions:
        if runs and runs[-1][1] == p:
            runs[-1] = (runs[-1][0], p + 1)
        else:
            runs.append((p, p + 1))
    return runs


class MultimodalMixin:
    """Part of Engine (engine.py): the image tokens, the vision encoder and M-RoPE positions."""

    def _image_token_id(self) -> int | None:
        """The placeholder token the processor expands per image, if images can be served.

        Images ride in paged steps only (their embeddings replace the placeholders' in the packed
        input).
        """
        if self.loaded.processor is None:
            return None
        cfg = self.model.config
        token = getattr(cfg, "image_token_id", None)
        if token is None:
            token = getattr(cfg, "image_token_index", None)
        why = None
        if token is None:
            why = "the model's config names no image token"
        elif not self.packed:
            why = "images need the paged engine path, which this model does not take"
        elif not hasattr(self.model, "get_image_features"):
            why = "the model has no get_image_features"
        if why is not None:
            log.warning("this vision-language model serves text only: %s", why)
            return None
        return int(token)

    @property
    def accepts_images(self) -> bool:
        return self.image_token_id is not None

    def _encode_images(self, seq: Sequence) -> None:
        """Run the vision encoder over a newcomer's images once: one embedding per image token,
        in the order the tokens appear (kept across preemption)."""
        mm = seq.request.multimodal
        t0 = time.perf_counter()
        inputs = {k: v.to(self.device) if hasattr(v, "to") else v for k, v in mm.encoder_inputs.items()}
        if "pixel_values" in inputs and inputs["pixel_values"].is_floating_point():
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        out = self.model.get_image_features(**inputs, return_dict=True)
        feats = getattr(out, "pooler_output", out)
        if isinstance(feats, (list, tuple)):
            feats = torch.cat([f.reshape(-1, f.shape[-1]) for f in feats])
        seq.image_embeds = feats.reshape(-1, feats.shape[-1])
        seq.image_positions = [i for i, t in enumerate(seq.request.prompt_ids) if t == self.image_token_id]
        if len(seq.image_positions) != seq.image_embeds.shape[0]:
            raise ValueError(
                f"{len(seq.image_positions)} image tokens in the prompt but "
                f"{seq.image_embeds.shape[0]} image embeddings"
            )
        seq.mm_key = (seq.image_positions[0], mm.digest) if seq.image_positions else None
        if self.images_attend_both_ways:
            seq.image_runs = image_runs(seq.image_positions)
        if self.mrope and "image_grid_thw" in inputs:
            ids = torch.tensor([seq.request.prompt_ids], device=self.device)
            pos, delta = self.model.model.get_rope_index(
                ids, (ids == self.image_token_id).int(), image_grid_thw=inputs["image_grid_thw"]
            )
            seq.mrope_prompt, seq.mrope_delta = pos[:, 0, :], int(delta.reshape(-1)[0])
        self.stats["images_encoded"] += mm.num_images
        self.stats["time_vision_s"] += time.perf_counter() - t0

    def _mrope_positions(self, seq: Sequence, start: int, n: int):
        """M-RoPE positions of tokens [start, start + n): the model's own per-axis positions over the
        prompt (images get 2-D grid positions), then one step per token on every axis."""
        prompt = seq.mrope_prompt
        if prompt is None:
            return [p + seq.mrope_delta for p in range(start, start + n)]
        inside = prompt[:, start : start + n]
        rest = max(0, start + n - prompt.shape[1])
        if not rest:
            return inside
        first = max(start, prompt.shape[1])
        tail = torch.arange(first, first + rest, device=self.device).expand(3, -1) + seq.mrope_delta
        return torch.cat([inside, tail], dim=1)
