"""SAM-Med3D prompt encoder: points / boxes -> sparse tokens, mask -> dense embedding.

Coordinates are voxel ``(z, y, x)`` positions in the model's input frame (``img_size^3``); the first
coordinate goes with the first row of the gaussian matrix and so on, matching the released weights.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple, Type

import torch
from torch import nn

from dcm.models.sam_med3d.common import LayerNorm3d

__all__ = ["PositionEmbeddingRandom3D", "PromptEncoder3D"]


class PositionEmbeddingRandom3D(nn.Module):
    """Random-Fourier positional encoding of normalised 3D coordinates.

    Buffer ``positional_encoding_gaussian_matrix`` (3, F) is persistent: it is part of every checkpoint
    and must be loaded from it (a fresh random one silently scrambles the prompt encoding).
    An encoding has ``3 F`` channels: ``[sin, cos, sin]`` of ``2 pi (2 u - 1) @ G`` with ``u`` in [0, 1].
    """

    def __init__(self, num_pos_feats: int = 128, scale: Optional[float] = None) -> None:
        super().__init__()
        if scale is None or scale <= 0.0:
            scale = 1.0
        self.register_buffer("positional_encoding_gaussian_matrix", scale * torch.randn((3, num_pos_feats)))

    def _pe_encoding(self, coords: torch.Tensor) -> torch.Tensor:
        """(..., 3) coordinates in [0, 1] -> (..., 3 F)."""
        gauss = self.positional_encoding_gaussian_matrix
        proj = 2 * math.pi * ((2 * coords - 1).to(gauss.dtype) @ gauss)
        sin = torch.sin(proj)
        return torch.cat([sin, torch.cos(proj), sin], dim=-1)

    def forward(self, size: Tuple[int, int, int]) -> torch.Tensor:
        """Dense encoding of the centres of a (D, H, W) grid -> (3 F, D, H, W).

        The SAM-Med3D grid puts the H-axis coordinate first and the D-axis coordinate second (the 2D SAM
        x/y convention carried to 3D); kept so that released weights see what they were trained on.
        """
        d, h, w = size
        gauss = self.positional_encoding_gaussian_matrix
        zs = (torch.arange(d, device=gauss.device, dtype=gauss.dtype) + 0.5) / d
        ys = (torch.arange(h, device=gauss.device, dtype=gauss.dtype) + 0.5) / h
        xs = (torch.arange(w, device=gauss.device, dtype=gauss.dtype) + 0.5) / w
        grid = torch.stack(torch.meshgrid(zs, ys, xs, indexing="ij"), dim=-1)  # (D, H, W, 3) as (z, y, x)
        grid = grid[..., [1, 0, 2]]
        return self._pe_encoding(grid).permute(3, 0, 1, 2)

    def forward_with_coords(self, coords: torch.Tensor, image_size: Tuple[int, int, int]) -> torch.Tensor:
        """(B, N, 3) unnormalised coordinates (already shifted to voxel centres) -> (B, N, 3 F)."""
        size = torch.tensor(image_size, dtype=coords.dtype, device=coords.device)
        return self._pe_encoding(coords / size)


class PromptEncoder3D(nn.Module):
    """Encodes point, box and mask prompts for the mask decoder.

    ``forward(points=(coords, labels), boxes=None, masks=None)`` -> ``(sparse, dense)``:

    * coords (B, N, 3) voxel (z, y, x) in the ``input_image_size`` frame, labels (B, N) with 1 positive,
      0 negative, -1 padding (2 / 3 box corners); each point is encoded at its voxel centre (+0.5);
      when no box is given a padding point is appended, so sparse is (B, N + 1, embed_dim);
    * boxes (B, 6) as two corners (z0, y0, x0, z1, y1, x1) -> two tokens;
    * masks (B, 1, 4g, 4g, 4g) logits/binary -> dense (B, embed_dim, g, g, g); without a mask the dense
      embedding is ``no_mask_embed`` broadcast to (B, embed_dim, g, g, g).
    """

    def __init__(
        self,
        embed_dim: int,
        image_embedding_size: Tuple[int, int, int],
        input_image_size: Tuple[int, int, int],
        mask_in_chans: int,
        activation: Type[nn.Module] = nn.GELU,
    ) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.image_embedding_size = tuple(image_embedding_size)
        self.input_image_size = tuple(input_image_size)
        self.pe_layer = PositionEmbeddingRandom3D(embed_dim // 3)
        self.num_point_embeddings = 4  # negative, positive, box corner 1, box corner 2
        self.point_embeddings = nn.ModuleList(nn.Embedding(1, embed_dim) for _ in range(self.num_point_embeddings))
        self.not_a_point_embed = nn.Embedding(1, embed_dim)
        self.mask_input_size = tuple(4 * s for s in self.image_embedding_size)
        self.mask_downscaling = nn.Sequential(
            nn.Conv3d(1, mask_in_chans // 4, kernel_size=2, stride=2),
            LayerNorm3d(mask_in_chans // 4),
            activation(),
            nn.Conv3d(mask_in_chans // 4, mask_in_chans, kernel_size=2, stride=2),
            LayerNorm3d(mask_in_chans),
            activation(),
            nn.Conv3d(mask_in_chans, embed_dim, kernel_size=1),
        )
        self.no_mask_embed = nn.Embedding(1, embed_dim)

    def get_dense_pe(self) -> torch.Tensor:
        """Positional encoding of the image-embedding grid: (1, embed_dim, g, g, g)."""
        return self.pe_layer(self.image_embedding_size).unsqueeze(0)

    def _embed_points(self, points: torch.Tensor, labels: torch.Tensor, pad: bool) -> torch.Tensor:
        points = points.to(self.positional_encoding_dtype) + 0.5
        if pad:
            points = torch.cat([points, points.new_zeros(points.shape[0], 1, 3)], dim=1)
            labels = torch.cat([labels, -torch.ones_like(labels[:, :1])], dim=1)
        emb = self.pe_layer.forward_with_coords(points, self.input_image_size)
        labels = labels[..., None]
        emb = torch.where(labels == -1, self.not_a_point_embed.weight.to(emb.dtype), emb)
        for value in range(self.num_point_embeddings):
            emb = emb + (labels == value).to(emb.dtype) * self.point_embeddings[value].weight.to(emb.dtype)
        return emb

    def _embed_boxes(self, boxes: torch.Tensor) -> torch.Tensor:
        corners = boxes.to(self.positional_encoding_dtype).reshape(-1, 2, 3) + 0.5
        emb = self.pe_layer.forward_with_coords(corners, self.input_image_size)
        extra = torch.cat([self.point_embeddings[2].weight, self.point_embeddings[3].weight], dim=0)
        return emb + extra.to(emb.dtype)

    def _embed_masks(self, masks: torch.Tensor) -> torch.Tensor:
        return self.mask_downscaling(masks)

    @property
    def positional_encoding_dtype(self) -> torch.dtype:
        return self.pe_layer.positional_encoding_gaussian_matrix.dtype

    def forward(
        self,
        points: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
        boxes: Optional[torch.Tensor] = None,
        masks: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Returns ``sparse`` (B, N_tokens, embed_dim) and ``dense`` (B, embed_dim, g, g, g)."""
        if points is not None:
            bs = points[0].shape[0]
        elif boxes is not None:
            bs = boxes.shape[0]
        elif masks is not None:
            bs = masks.shape[0]
        else:
            bs = 1
        ref = self.no_mask_embed.weight
        sparse = ref.new_empty((bs, 0, self.embed_dim))
        if points is not None:
            coords, labels = points
            sparse = torch.cat([sparse, self._embed_points(coords, labels, pad=boxes is None).to(ref.dtype)], 1)
        if boxes is not None:
            sparse = torch.cat([sparse, self._embed_boxes(boxes).to(ref.dtype)], dim=1)
        if masks is not None:
            dense = self._embed_masks(masks.to(ref.dtype))
        else:
            dense = ref.reshape(1, -1, 1, 1, 1).expand(bs, -1, *self.image_embedding_size)
        return sparse, dense
