"""SAM-Med3D mask decoder: two-way transformer, upscaling and hypernetwork mask heads."""

from __future__ import annotations

from typing import List, Optional, Tuple, Type

import torch
import torch.nn.functional as F
from torch import nn

from dcm.models.sam_med3d.common import LayerNorm3d
from dcm.models.sam_med3d.transformer import TwoWayTransformer3D

__all__ = ["MLP", "MaskDecoder3D"]


class MLP(nn.Module):
    """``num_layers`` Linear layers with ReLU between them (``layers.i``); (..., in) -> (..., out)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int,
                 sigmoid_output: bool = False) -> None:
        super().__init__()
        dims_in = [input_dim] + [hidden_dim] * (num_layers - 1)
        dims_out = [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims_in, dims_out))
        self.sigmoid_output = sigmoid_output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return torch.sigmoid(x) if self.sigmoid_output else x


class MaskDecoder3D(nn.Module):
    """Predicts low-resolution mask logits from the image embedding and prompt embeddings.

    ``forward(image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings,
    multimask_output)``:

    * image_embeddings (B or 1, dim, g, g, g), image_pe (1 or B, dim, g, g, g),
      sparse (B, Nt, dim), dense (B, dim, g, g, g), axes (z, y, x);
    * returns logits (B, M, 4g, 4g, 4g) and IoU predictions (B, M) (None without an IoU head), where
      M = 1 unless ``multimask_output`` and the decoder has more than one mask token (then the
      ``num_multimask_outputs`` masks after the first).
    """

    def __init__(
        self,
        *,
        transformer_dim: int,
        num_multimask_outputs: int = 3,
        transformer_depth: int = 2,
        transformer_mlp_dim: int = 2048,
        transformer_num_heads: int = 8,
        activation: Type[nn.Module] = nn.GELU,
        iou_head: bool = True,
        iou_head_depth: int = 3,
        iou_head_hidden_dim: int = 256,
    ) -> None:
        super().__init__()
        self.transformer_dim = transformer_dim
        self.transformer = TwoWayTransformer3D(
            depth=transformer_depth,
            embedding_dim=transformer_dim,
            mlp_dim=transformer_mlp_dim,
            num_heads=transformer_num_heads,
        )
        self.num_multimask_outputs = num_multimask_outputs
        self.iou_token = nn.Embedding(1, transformer_dim)
        self.num_mask_tokens = num_multimask_outputs + 1
        self.mask_tokens = nn.Embedding(self.num_mask_tokens, transformer_dim)
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose3d(transformer_dim, transformer_dim // 4, kernel_size=2, stride=2),
            LayerNorm3d(transformer_dim // 4),
            activation(),
            nn.ConvTranspose3d(transformer_dim // 4, transformer_dim // 8, kernel_size=2, stride=2),
            activation(),
        )
        self.output_hypernetworks_mlps = nn.ModuleList(
            MLP(transformer_dim, transformer_dim, transformer_dim // 8, 3) for _ in range(self.num_mask_tokens)
        )
        self.iou_prediction_head: Optional[MLP] = None
        if iou_head:
            self.iou_prediction_head = MLP(transformer_dim, iou_head_hidden_dim, self.num_mask_tokens, iou_head_depth)

    def forward(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        multimask_output: bool = False,
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        masks, iou_pred = self.predict_masks(
            image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings
        )
        if multimask_output and self.num_mask_tokens > 1:
            sl = slice(1, None)
        else:
            sl = slice(0, 1)
        return masks[:, sl], (None if iou_pred is None else iou_pred[:, sl])

    def predict_masks(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """All mask tokens' logits (B, num_mask_tokens, 4g, 4g, 4g) and IoU (B, num_mask_tokens) or None."""
        bs = sparse_prompt_embeddings.shape[0]
        out_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)
        out_tokens = out_tokens.unsqueeze(0).expand(bs, -1, -1).to(sparse_prompt_embeddings.dtype)
        tokens = torch.cat([out_tokens, sparse_prompt_embeddings], dim=1)

        src = image_embeddings
        if src.shape[0] != bs:
            src = torch.repeat_interleave(src, bs, dim=0)
        src = src + dense_prompt_embeddings
        pos = image_pe
        if pos.shape[0] != bs:
            pos = torch.repeat_interleave(pos, bs, dim=0)
        b, c, d, h, w = src.shape

        hs, keys = self.transformer(src, pos, tokens)
        iou_token_out = hs[:, 0, :]
        mask_tokens_out = hs[:, 1 : 1 + self.num_mask_tokens, :]

        upscaled = self.output_upscaling(keys.transpose(1, 2).reshape(b, c, d, h, w))
        hyper: List[torch.Tensor] = [
            mlp(mask_tokens_out[:, i, :]) for i, mlp in enumerate(self.output_hypernetworks_mlps)
        ]
        hyper_in = torch.stack(hyper, dim=1)  # (B, M, c')
        b, c2, d2, h2, w2 = upscaled.shape
        masks = (hyper_in @ upscaled.reshape(b, c2, d2 * h2 * w2)).reshape(b, -1, d2, h2, w2)
        iou_pred = None if self.iou_prediction_head is None else self.iou_prediction_head(iou_token_out)
        return masks, iou_pred
