"""Reading what a diffusion UNet knows: cross-attention maps and decoder features.

DatasetDM's P-Decoder reads two things from the UNet during one denoising step:
(1) per-token cross-attention probabilities, which say where each word of the prompt
lands, and (2) the multi-scale feature maps of the UNet's decoder (up) blocks.

We collect (1) with diffusers' attention-processor API: a processor is installed on
cross-attention layers only, and it computes probabilities explicitly *only while
capture is active*; otherwise it takes the same fused scaled-dot-product path as the
stock processor, so sampling steps that capture nothing run at full speed.
(2) comes from forward hooks on the last module of each up block before its
upsampler (an up block's own output is already upsampled).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

logger = logging.getLogger(__name__)


class _CapturingCrossAttnProcessor:
    """Cross-attention that records head-averaged probabilities when asked."""

    def __init__(self, capture: "FeatureCapture", fast: Any) -> None:
        self.capture = capture
        self.fast = fast

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        if not self.capture.active:
            return self.fast(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)
        # The classic (non-fused) path of diffusers' AttnProcessor, keeping the probabilities.
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        context = encoder_hidden_states if encoder_hidden_states is not None else hidden_states
        batch, seq_len, _ = context.shape
        attention_mask = attn.prepare_attention_mask(attention_mask, seq_len, batch)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is not None and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        key = attn.head_to_batch_dim(attn.to_k(context))
        value = attn.head_to_batch_dim(attn.to_v(context))
        query = attn.head_to_batch_dim(query)
        probs = attn.get_attention_scores(query, key, attention_mask)  # (B*heads, HW, T)
        self.capture.record_attention(probs.view(batch, attn.heads, *probs.shape[1:]).mean(1))
        out = attn.batch_to_head_dim(torch.bmm(probs, value))
        out = attn.to_out[1](attn.to_out[0](out))
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


class FeatureCapture:
    """Context manager that instruments a ``UNet2DConditionModel`` for capture.

    Set ``active = True`` around the one UNet call whose features you want, then call
    ``features(latent_hw)``; ``reset()`` before the next capture. Outside the ``with``
    block the UNet is exactly as it was.
    """

    def __init__(self, unet: torch.nn.Module) -> None:
        self.unet = unet
        self.active = False
        self._attention: list[torch.Tensor] = []
        self._maps: dict[int, torch.Tensor] = {}
        self._saved_processors: dict[str, Any] | None = None
        self._hooks: list[Any] = []

    def __enter__(self) -> "FeatureCapture":
        self._saved_processors = dict(self.unet.attn_processors)
        procs: dict[str, Any] = {}
        for name, proc in self._saved_processors.items():
            # attn2 is the cross-attention of every BasicTransformerBlock.
            is_cross = name.endswith("attn2.processor")
            procs[name] = _CapturingCrossAttnProcessor(self, AttnProcessor2_0()) if is_cross else proc
        capturing = sum(isinstance(p, _CapturingCrossAttnProcessor) for p in procs.values())
        self.unet.set_attn_processor(procs)  # diffusers empties the dict it is given
        for i, block in enumerate(self.unet.up_blocks):
            last = block.attentions[-1] if getattr(block, "attentions", None) else block.resnets[-1]
            self._hooks.append(last.register_forward_hook(self._map_hook(i)))
        logger.info(
            "feature capture installed: %d cross-attention layers, maps of %d up blocks", capturing, len(self._hooks)
        )
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        if self._saved_processors is not None:
            self.unet.set_attn_processor(self._saved_processors)
        self.active = False

    def reset(self) -> None:
        self._attention.clear()
        self._maps.clear()

    def record_attention(self, probs: torch.Tensor) -> None:
        self._attention.append(probs)

    def _map_hook(self, index: int) -> Any:
        def hook(module: torch.nn.Module, inputs: Any, output: Any) -> None:
            if self.active:
                out = output.sample if hasattr(output, "sample") else output
                self._maps[index] = out[0] if isinstance(out, tuple) else out

        return hook

    def collected(self, latent_hw: tuple[int, int]) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Return (maps coarse->fine, attention (B, T, h, w)) from the last active call.

        Attention maps of every cross-attention layer are averaged over heads, resized to
        the finest attention resolution and averaged over layers, as DatasetDM does.
        """
        if not self._attention or not self._maps:
            raise RuntimeError("nothing was captured: was `active` set during a UNet call?")
        lh, lw = latent_hw
        grids = []
        for probs in self._attention:
            b, hw, t = probs.shape
            scale = round((lh * lw / hw) ** 0.5)
            grids.append(probs.transpose(1, 2).reshape(b, t, lh // scale, lw // scale))
        size = max(g.shape[-2:] for g in grids)
        attention = torch.stack(
            [F.interpolate(g, size=size, mode="bilinear", align_corners=False) for g in grids]
        ).mean(0)
        maps = [self._maps[i] for i in sorted(self._maps)]
        maps.sort(key=lambda m: m.shape[-1])
        return maps, attention
