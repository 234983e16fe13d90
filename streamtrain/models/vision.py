"""Image encoders: a small random-init CNN, torchvision classifiers and Hugging Face vision models.

Every encoder maps images [B, 3, H, W] to a pooled embedding [B, output_dim] (``forward``) and
to grid tokens [B, N, output_dim] (``forward_features``), one token per patch or feature-map cell.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import safetensors.torch
import torch
import torch.nn.functional as F
import torchvision.models as tvm
from torch import Tensor, nn
from transformers import AutoModel, PreTrainedModel

from streamtrain.config.models import VisionConfig
from streamtrain.errors import UserError


class VisionEncoder(nn.Module):
    """Images [B, 3, H, W] -> pooled [B, output_dim] (forward) or grid tokens [B, N, output_dim]."""

    output_dim: int

    def encode(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Both outputs of one pass: (pooled [B, output_dim], grid [B, N, output_dim])."""
        raise NotImplementedError

    def forward(self, images: Tensor) -> Tensor:
        return self.encode(images)[0]

    def forward_features(self, images: Tensor) -> Tensor:
        """Patch / feature-map tokens [B, N, output_dim], e.g. for a vision-language model."""
        return self.encode(images)[1]


def _grid_tokens(feature_map: Tensor) -> Tensor:
    """[B, C, h, w] -> [B, h * w, C], row-major over the map."""
    return feature_map.flatten(2).transpose(1, 2)


def _conv_block(in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.GELU(),
    )


class SmallCNNEncoder(VisionEncoder):
    """Four conv3x3-BN-GELU blocks, all but the second stride 2: a 32 px image gives a 4x4 grid.

    The first block already halves the resolution, as full-resolution maps dominated the CPU
    step time; 32 px digits still reach ~0.89 held-out accuracy within 60 steps (see its test).
    """

    def __init__(self, width: int = 64) -> None:
        super().__init__()
        if width < 1:
            raise UserError(f"VisionConfig.width must be positive, got {width}")
        self.blocks = nn.Sequential(
            _conv_block(3, width, 2),
            _conv_block(width, width, 1),
            _conv_block(width, 2 * width, 2),
            _conv_block(2 * width, 2 * width, 2),
        )
        self.output_dim = 2 * width

    def encode(self, images: Tensor) -> tuple[Tensor, Tensor]:
        grid = _grid_tokens(self.blocks(images))
        return grid.mean(dim=1), grid


def torchvision_trunk(model: nn.Module) -> nn.Module:
    """The part of a torchvision CNN classifier that maps images to its last [B, C, h, w] feature map.

    Chosen by the model's class and module structure; raises ValueError for families whose
    forward pass is not a plain chain ending in pooling + classifier (GoogLeNet, Inception, MaxViT).
    """
    if isinstance(model, tvm.ResNet):  # also ResNeXt and wide ResNets
        stages = [model.layer1, model.layer2, model.layer3, model.layer4]
        return nn.Sequential(model.conv1, model.bn1, model.relu, model.maxpool, *stages)
    if isinstance(model, tvm.RegNet):
        return nn.Sequential(model.stem, model.trunk_output)
    if isinstance(model, tvm.ShuffleNetV2):
        return nn.Sequential(
            model.conv1, model.maxpool, model.stage2, model.stage3, model.stage4, model.conv5
        )
    if isinstance(model, tvm.MNASNet):
        return model.layers
    if isinstance(model, tvm.SwinTransformer):
        # Swin's features are channels-last; its own norm + permute give [B, C, h, w].
        return nn.Sequential(model.features, model.norm, model.permute)
    if isinstance(model, tvm.DenseNet):
        # DenseNet's features end in a BatchNorm; its forward applies the last ReLU outside them.
        return nn.Sequential(model.features, nn.ReLU())
    features = getattr(model, "features", None)
    if isinstance(features, nn.Module):  # ConvNeXt, EfficientNet, MobileNet, VGG, AlexNet, SqueezeNet
        return features
    raise UserError(f"no known feature trunk for torchvision model class {type(model).__name__}")


class TorchvisionConvEncoder(VisionEncoder):
    """A torchvision CNN without its classifier; grid = last feature map, pooled = its mean."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.trunk = torchvision_trunk(model)
        self.output_dim = self._probe_channels()

    @torch.no_grad()
    def _probe_channels(self) -> int:
        # Channel counts are not exposed uniformly (a classifier's first Linear may sit behind a
        # flatten of a 7x7 map, as in VGG), so one forward at the ImageNet size reads them off.
        was_training = self.trunk.training
        self.trunk.eval()
        parameter = next(self.trunk.parameters())
        probe = torch.zeros(1, 3, 224, 224, dtype=parameter.dtype, device=parameter.device)
        channels = self.trunk(probe).shape[1]
        self.trunk.train(was_training)
        return int(channels)

    def encode(self, images: Tensor) -> tuple[Tensor, Tensor]:
        grid = _grid_tokens(self.trunk(images))
        return grid.mean(dim=1), grid


class TorchvisionViTEncoder(VisionEncoder):
    """A torchvision VisionTransformer without its head; pooled = CLS token, grid = patch tokens.

    Unlike torchvision's forward, any image size divisible by the patch size works: the position
    embeddings of the patch grid are resized bicubically when the grid differs from training.
    """

    def __init__(self, model: tvm.VisionTransformer) -> None:
        super().__init__()
        self.conv_proj = model.conv_proj
        self.class_token = model.class_token
        self.encoder = model.encoder
        self.patch_size = model.patch_size
        self.trained_grid = model.image_size // model.patch_size
        self.output_dim = model.hidden_dim

    def _position_embedding(self, grid_h: int, grid_w: int) -> Tensor:
        position = self.encoder.pos_embedding
        if (grid_h, grid_w) == (self.trained_grid, self.trained_grid):
            return position
        cls_position, patch_position = position[:, :1], position[:, 1:]
        side = self.trained_grid
        patch_position = patch_position.reshape(1, side, side, -1).permute(0, 3, 1, 2)
        patch_position = F.interpolate(patch_position, size=(grid_h, grid_w), mode="bicubic")
        return torch.cat([cls_position, patch_position.flatten(2).transpose(1, 2)], dim=1)

    def encode(self, images: Tensor) -> tuple[Tensor, Tensor]:
        patches = self.conv_proj(images)
        grid_h, grid_w = patches.shape[-2:]
        tokens = _grid_tokens(patches)
        tokens = torch.cat([self.class_token.expand(tokens.shape[0], -1, -1), tokens], dim=1)
        tokens = tokens + self._position_embedding(grid_h, grid_w)
        tokens = self.encoder.ln(self.encoder.layers(self.encoder.dropout(tokens)))
        return tokens[:, 0], tokens[:, 1:]


class HFVisionEncoder(VisionEncoder):
    """A Hugging Face ViT-style vision model (CLIPVisionModel, SiglipVisionModel, Dinov2Model, ...).

    pooled = ``pooler_output`` when the model has one, else the mean of the patch tokens;
    grid = the patch tokens of ``last_hidden_state``, without the CLS (and register) tokens.
    """

    def __init__(self, model: PreTrainedModel) -> None:
        super().__init__()
        config = model.config
        if not isinstance(getattr(config, "patch_size", None), int):
            raise UserError(
                f"{type(model).__name__} is not a ViT-style vision model "
                "(its config has no integer patch_size)"
            )
        self.model = model
        self.patch_size: int = config.patch_size
        self.output_dim = int(config.hidden_size)
        # CLIP and SigLIP only accept other image sizes when asked to; DINOv2 always interpolates.
        self._interpolate = "interpolate_pos_encoding" in inspect.signature(model.forward).parameters

    def encode(self, images: Tensor) -> tuple[Tensor, Tensor]:
        extra = {"interpolate_pos_encoding": True} if self._interpolate else {}
        outputs = self.model(pixel_values=images, **extra)
        hidden = outputs.last_hidden_state
        num_patches = (images.shape[-2] // self.patch_size) * (images.shape[-1] // self.patch_size)
        # Tokens ahead of the patches are CLS / register tokens: CLIP and DINOv2 have a CLS token,
        # DINOv2-with-registers adds registers, SigLIP has none. Counting patches covers them all.
        grid = hidden[:, hidden.shape[1] - num_patches :]
        pooled = getattr(outputs, "pooler_output", None)
        return (grid.mean(dim=1) if pooled is None else pooled), grid


def _load_state_dict(path: Path) -> dict[str, Tensor]:
    if not path.is_file():
        raise UserError(f"VisionConfig.path: no weights file at {str(path)!r}")
    if path.suffix == ".safetensors":
        return safetensors.torch.load_file(path)
    if path.suffix in (".pt", ".pth"):
        return torch.load(path, map_location="cpu", weights_only=True)
    raise UserError(f"VisionConfig.path: expected a .safetensors, .pt or .pth file, got {str(path)!r}")


def build_torchvision_model(config: VisionConfig) -> nn.Module:
    """The full torchvision classifier named by ``config.name``, with the requested weights."""
    known = tvm.list_models(module=tvm)
    if config.name not in known:
        raise UserError(
            f"VisionConfig.name: unknown torchvision classification model {config.name!r}; "
            f"known: {', '.join(known)}"
        )
    if config.pretrained and config.path is not None:
        raise UserError("VisionConfig: set either pretrained=True or a weights path, not both")
    model = tvm.get_model(config.name, weights="DEFAULT" if config.pretrained else None)
    if config.path is not None:
        state_dict = _load_state_dict(Path(config.path))
        try:
            model.load_state_dict(state_dict)
        except RuntimeError as error:
            raise UserError(
                f"VisionConfig.path: {config.path!r} is not a state dict of "
                f"torchvision's {config.name}: {error}"
            ) from error
    return model


def load_hf_vision_model(path: str) -> PreTrainedModel:
    """The vision model at ``path``: the model itself, or the vision tower of a dual encoder."""
    try:
        model = AutoModel.from_pretrained(path)
    except (OSError, ValueError) as error:
        raise UserError(
            f"VisionConfig.path: cannot load a Hugging Face model from {path!r}: {error}"
        ) from error
    if getattr(model.config, "vision_config", None) is None:
        return model
    # Dual encoders (CLIPModel, SiglipModel) keep their image tower as `vision_model`.
    tower = getattr(model, "vision_model", None)
    if not isinstance(tower, nn.Module):
        raise UserError(
            f"VisionConfig.path: {type(model).__name__} at {path!r} has a vision_config but no vision_model"
        )
    return tower


def build_vision_encoder(config: VisionConfig) -> VisionEncoder:
    """The image encoder described by ``config``; ValueError for a bad name, path or kind."""
    if config.kind == "small_cnn":
        return SmallCNNEncoder(config.width)
    if config.kind == "torchvision":
        model = build_torchvision_model(config)
        if isinstance(model, tvm.VisionTransformer):
            return TorchvisionViTEncoder(model)
        return TorchvisionConvEncoder(model)
    if config.kind == "huggingface":
        if config.path is None:
            raise UserError("VisionConfig.path: required for kind 'huggingface'")
        return HFVisionEncoder(load_hf_vision_model(config.path))
    raise UserError(
        f"VisionConfig.kind: unknown {config.kind!r}; allowed: 'small_cnn', 'torchvision', 'huggingface'"
    )
