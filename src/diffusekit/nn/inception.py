"""The Inception-v3 variant used by the TensorFlow FID code, for 2048-d pool3 features.

This is the network of Heusel et al. 2017 (TTUR, "GANs trained by a two time-scale update rule"),
graph `inception-2015-12-05`. It differs from torchvision's Inception-v3 in three places that
change the features, so FID numbers are only comparable when these are kept:
- 1008 output classes (the fc layer is unused for features, but it is in the weights file);
- the average-pool branches of the A, C and first E blocks exclude the zero padding from the
  mean (`count_include_pad=False`, as TensorFlow's average pool does);
- the last E block (Mixed_7c) pools its pool branch with a max pool, not an average pool.

Module and parameter names follow torchvision's Inception3, so the state dict that pytorch-fid
publishes as `pt_inception-2015-12-05-6726825d.pth` loads strictly. We never download it.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

FID_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
FID_WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                   + FID_WEIGHTS_FILE)


class BasicConv2d(nn.Module):
    """Conv (no bias) -> BatchNorm (eps=1e-3, the TF value) -> ReLU."""

    def __init__(self, in_channels: int, out_channels: int, **conv_kwargs):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, bias=False, **conv_kwargs)
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg_pool_tf(x: torch.Tensor) -> torch.Tensor:
    # TF's 'SAME' average pool divides by the number of real (unpadded) pixels in the window
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    """35x35 block: 1x1, 5x5, double 3x3 and pool branches (Mixed_5b..5d)."""

    def __init__(self, in_channels: int, pool_features: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(in_channels, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(in_channels, pool_features, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch5x5 = self.branch5x5_2(self.branch5x5_1(x))
        branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        branch_pool = self.branch_pool(_avg_pool_tf(x))
        return torch.cat([self.branch1x1(x), branch5x5, branch3x3dbl, branch_pool], dim=1)


class InceptionB(nn.Module):
    """Grid reduction 35x35 -> 17x17 (Mixed_6a)."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(in_channels, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        branch_pool = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([self.branch3x3(x), branch3x3dbl, branch_pool], dim=1)


class InceptionC(nn.Module):
    """17x17 block with factorised 7x7 convolutions (Mixed_6b..6e)."""

    def __init__(self, in_channels: int, channels_7x7: int):
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch7x7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        branch7x7dbl = x
        for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3,
                      self.branch7x7dbl_4, self.branch7x7dbl_5):
            branch7x7dbl = layer(branch7x7dbl)
        branch_pool = self.branch_pool(_avg_pool_tf(x))
        return torch.cat([self.branch1x1(x), branch7x7, branch7x7dbl, branch_pool], dim=1)


class InceptionD(nn.Module):
    """Grid reduction 17x17 -> 8x8 (Mixed_7a)."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch3x3 = self.branch3x3_2(self.branch3x3_1(x))
        branch7x7x3 = x
        for layer in (self.branch7x7x3_1, self.branch7x7x3_2, self.branch7x7x3_3,
                      self.branch7x7x3_4):
            branch7x7x3 = layer(branch7x7x3)
        branch_pool = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([branch3x3, branch7x7x3, branch_pool], dim=1)


class InceptionE(nn.Module):
    """8x8 block with expanded 1x3/3x1 filter banks (Mixed_7b, Mixed_7c).

    pool="avg" is the TF average pool without padding (Mixed_7b); pool="max" is the max pool
    that the FID graph uses in Mixed_7c.
    """

    def __init__(self, in_channels: int, pool: str = "avg"):
        super().__init__()
        if pool not in ("avg", "max"):
            raise ValueError(f"pool={pool!r} is not allowed; choose 'avg' or 'max'.")
        self.pool = pool
        self.branch1x1 = BasicConv2d(in_channels, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(in_channels, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch3x3 = self.branch3x3_1(x)
        branch3x3 = torch.cat([self.branch3x3_2a(branch3x3), self.branch3x3_2b(branch3x3)], 1)
        branch3x3dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        branch3x3dbl = torch.cat(
            [self.branch3x3dbl_3a(branch3x3dbl), self.branch3x3dbl_3b(branch3x3dbl)], 1)
        if self.pool == "avg":
            pooled = _avg_pool_tf(x)
        else:
            pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        branch_pool = self.branch_pool(pooled)
        return torch.cat([self.branch1x1(x), branch3x3, branch3x3dbl, branch_pool], dim=1)


class FIDInceptionV3(nn.Module):
    """FID Inception-v3: (B, 3, 299, 299) in [-1, 1] -> (B, 2048) pool3 features.

    The caller resizes and normalises (see InceptionFeatures); the network itself is
    fully convolutional up to the global average pool. `logits` gives the 1008-way output.
    """

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, pool="avg")
        self.Mixed_7c = InceptionE(2048, pool="max")
        self.fc = nn.Linear(2048, 1008)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (B, 3, 299, 299) -> (B, 192, 35, 35)
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        # (B, 192, 35, 35) -> (B, 2048, 8, 8)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b,
                      self.Mixed_6c, self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b,
                      self.Mixed_7c):
            x = block(x)
        # (B, 2048, 8, 8) -> (B, 2048): the pool3 features
        return x.mean(dim=(2, 3))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """The 1008-way classifier output for (B, 3, 299, 299) inputs in [-1, 1]."""
        return self.fc(self.forward(x))


def load_fid_inception(weights_path: str | Path) -> FIDInceptionV3:
    """Build FIDInceptionV3 in eval mode with the weights at weights_path (loaded strictly, on CPU)."""
    weights_path = Path(weights_path)
    if not weights_path.is_file():
        raise FileNotFoundError(
            f"FID Inception weights not found at {str(weights_path)!r}. The file needed is "
            f"{FID_WEIGHTS_FILE} (the TF FID graph inception-2015-12-05 ported to PyTorch by "
            f"pytorch-fid). diffusekit never downloads it: fetch it yourself from {FID_WEIGHTS_URL} "
            f"and pass its path, or use another feature extractor (ClassifierFeatures, "
            f"RawPixelFeatures).")
    state_dict = torch.load(weights_path, weights_only=True, map_location="cpu")
    network = FIDInceptionV3()
    network.load_state_dict(state_dict, strict=True)
    return network.eval().requires_grad_(False)


def quantize_8bit(images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] as the 8-bit pixels a PNG of them holds, scaled to [0, 1]: round((x + 1) * 127.5) / 255
    (x clamped; the rounding of data.to_pixels, so these are exactly the pixels `sample --out` writes)."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round() / 255


class InceptionFeatures:
    """The standard FID features: 2048-d pool3 of the TF FID Inception-v3.

    Pass weights_path (pytorch-fid's pt_inception-2015-12-05-6726825d.pth, which you download;
    we never do), or an already built `network` (e.g. randomly initialised, for tests).
    As pytorch-fid does with image files, so that an FID here compares with one computed there on the
    same images written as PNGs: the images are quantised to 8 bits and scaled to [0, 1]
    (`quantize_8bit`), grayscale is repeated to 3 channels, the batch is resized to 299x299 bilinearly
    (align_corners=False) and scaled to the network's [-1, 1] (2x - 1). torch-fidelity resizes with
    TF1's bilinear rule and scales by (x - 128) / 128 instead, so its FID differs slightly.
    """

    name = "inception-fid-pool3-u8"     # the reference-stats cache key: caches from before quantisation differ

    def __init__(self, weights_path: str | Path | None = None, *, network=None,
                 device: str | torch.device = "cpu"):
        if (weights_path is None) == (network is None):
            raise ValueError("InceptionFeatures needs exactly one of weights_path (the path of "
                             "pt_inception-2015-12-05-6726825d.pth) or network.")
        network = load_fid_inception(weights_path) if network is None else network
        self.device = torch.device(device)
        self.network = network.eval().requires_grad_(False).to(self.device)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"InceptionFeatures needs images (B, 1 or 3, H, W); got "
                             f"{tuple(images.shape)}.")
        x = quantize_8bit(images.to(self.device, torch.float32))
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        return self.network(2 * x - 1).cpu()
