"""Hugging Face wrapper: `CompeteSMoEConfig` + `CompeteSMoEForCausalLM` around `MoETransformer`.

    import competesmoe.model.hf  # registers model_type "competesmoe" with the Auto classes
    model = AutoModelForCausalLM.from_pretrained(DIR); tok = AutoTokenizer.from_pretrained(DIR)

The config stores our `ModelConfig` as a dict (`model_config`) plus the standard HF names derived
from it. `forward` returns `MoeCausalLMOutputWithPast`; with `labels` the loss is the LM cross-entropy
with HF's shift (labels[:, 1:] vs logits[:, :-1], -100 ignored) plus the MoE auxiliary loss (balance,
z-loss and, on competition steps, γ·L_D + β·L_div of Eq. (5)), so fine-tuning through transformers'
`Trainer` trains the routers as our own trainer does. `config.include_aux_loss=False` (or
`forward(..., include_aux_loss=False)`) gives the LM loss alone; `aux_loss` is returned either way.
The KV cache is a transformers `DynamicCache` (or a legacy tuple of per-layer (k, v)).
Padded batches (an attention mask with zeros) are not supported: the model has no padding mask.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import (AutoConfig, AutoModelForCausalLM, GenerationMixin, PretrainedConfig, PreTrainedModel,
                          PreTrainedTokenizerFast)
from transformers.cache_utils import Cache, DynamicLayer
from transformers.modeling_outputs import MoeCausalLMOutputWithPast

from ..data.tokenizer import EOS, eos_id
from .transformer import ModelConfig, MoETransformer

MODEL_TYPE = "competesmoe"


class CompeteSMoEConfig(PretrainedConfig):
    """HF config holding `ModelConfig.to_dict()` in `model_config`; the standard names are derived."""
    model_type = MODEL_TYPE
    model_config: dict | None = None
    vocab_size: int = 4096
    hidden_size: int = 128
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    max_position_embeddings: int = 256
    tie_word_embeddings: bool = True
    use_cache: bool = True
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    include_aux_loss: bool = True   # `loss` = LM loss + the MoE auxiliary loss when labels are given

    def __post_init__(self, **kwargs: Any) -> None:
        if self.model_config is None:
            self.model_config = ModelConfig().to_dict()
        mc = ModelConfig.from_dict(self.model_config)  # validates
        self.model_config = mc.to_dict()
        self.vocab_size, self.hidden_size = mc.vocab_size, mc.d_model
        self.num_hidden_layers, self.num_attention_heads = mc.n_layers, mc.n_heads
        self.max_position_embeddings, self.tie_word_embeddings = mc.max_seq_len, mc.tie_embeddings
        super().__post_init__(**kwargs)

    def to_model_config(self) -> ModelConfig:
        return ModelConfig.from_dict(self.model_config)


class CompeteSMoEForCausalLM(PreTrainedModel, GenerationMixin):
    """`MoETransformer` as a transformers causal LM (weights under `model.`)."""
    config_class = CompeteSMoEConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _tied_weights_keys = {"model.head.weight": "model.embed.weight"}
    _supports_sdpa = True

    def __init__(self, config: CompeteSMoEConfig) -> None:
        super().__init__(config)
        self.model = MoETransformer(config.to_model_config())
        self.post_init()

    @classmethod
    def from_transformer(cls, model: MoETransformer, eos_token_id: int | None = None) -> "CompeteSMoEForCausalLM":
        """Wrap a trained `MoETransformer` (its weights are copied)."""
        config = CompeteSMoEConfig(model_config=model.cfg.to_dict(), eos_token_id=eos_token_id,
                                   pad_token_id=eos_token_id)
        hf = cls(config)
        hf.model.load_state_dict(model.state_dict())
        return hf.to(next(model.parameters()).device).eval()

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any) -> "CompeteSMoEForCausalLM":
        """As `PreTrainedModel.from_pretrained`, then zero the non-persistent buffers (running router
        statistics, zeros at construction), which transformers leaves uninitialised."""
        model = super().from_pretrained(*args, **kwargs)
        with torch.no_grad():
            for module in model.modules():
                for name in module._non_persistent_buffers_set:
                    buf = getattr(module, name, None)
                    if isinstance(buf, torch.Tensor):
                        buf.zero_()
        realign_parameters(model)
        return model

    def _init_weights(self, module: torch.nn.Module) -> None:
        if module is self.model:  # our own init (GPT-2 style); loaded weights overwrite it
            module.reset_parameters()

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.model.embed

    def set_input_embeddings(self, value: torch.nn.Module) -> None:
        self.model.embed = value

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.model.head

    def set_output_embeddings(self, value: torch.nn.Module) -> None:
        self.model.head = value

    @property
    def max_length(self) -> int:
        """For `competesmoe.eval.evaluate`."""
        return self.config.max_position_embeddings

    def _legacy_cache(self, cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
        if cache is None:
            return None
        if isinstance(cache, (list, tuple)):
            return list(cache) or None
        if not isinstance(cache, Cache):
            raise TypeError(f"unsupported cache type {type(cache).__name__}")
        if cache.get_seq_length() == 0:
            return None
        if not all(type(layer) is DynamicLayer for layer in cache.layers[: self.config.num_hidden_layers]):
            raise ValueError("CompeteSMoE supports only a DynamicCache (cache_implementation='dynamic')")
        return [(layer.keys, layer.values) for layer in cache.layers[: self.config.num_hidden_layers]]

    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, cache: Any = None, past_key_values: Any = None,
                inputs_embeds: torch.Tensor | None = None, labels: torch.LongTensor | None = None,
                use_cache: bool | None = None, logits_to_keep: int = 0, return_dict: bool | None = None,
                include_aux_loss: bool | None = None, **kwargs: Any) -> MoeCausalLMOutputWithPast:
        if input_ids is None or inputs_embeds is not None:
            raise ValueError("CompeteSMoE takes input_ids (inputs_embeds are not supported)")
        if attention_mask is not None and attention_mask.ndim == 2 and not bool(attention_mask.all()):
            raise ValueError("CompeteSMoE has no padding mask: padded batches (attention_mask with zeros) are "
                             "not supported; run unpadded sequences (batch size 1 or equal lengths)")
        cache = cache if cache is not None else past_key_values
        use_cache = (cache is not None) if use_cache is None else use_cache
        legacy = self._legacy_cache(cache)
        past = 0 if legacy is None else legacy[0][0].shape[2]
        out = self.model(input_ids, cache=legacy, use_cache=use_cache)
        logits = out.logits if not logits_to_keep else out.logits[:, -logits_to_keep:]
        loss = None
        if labels is not None:
            shift_logits = out.logits[:, :-1].float()
            shift_labels = labels[:, 1:].to(shift_logits.device)
            loss = F.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1),
                                   ignore_index=-100)
            if self.config.include_aux_loss if include_aux_loss is None else include_aux_loss:
                loss = loss + out.aux_loss
        new_cache = None
        if use_cache:
            if isinstance(cache, Cache):
                for i, (k, v) in enumerate(out.cache):
                    cache.update(k[:, :, past:], v[:, :, past:], i)
                new_cache = cache
            else:  # legacy tuple in, legacy tuple out (a DynamicCache when nothing was passed)
                new_cache = tuple(out.cache) if cache is not None else self._new_cache(out.cache)
        return _output(loss, out.aux_loss, logits, new_cache)

    def _new_cache(self, kv: list[tuple[torch.Tensor, torch.Tensor]]) -> Cache:
        from transformers import DynamicCache
        cache = DynamicCache(config=self.config)
        for i, (k, v) in enumerate(kv):
            cache.update(k, v, i)
        return cache


def _output(loss: torch.Tensor | None, aux_loss: torch.Tensor, logits: torch.Tensor,
            cache: Any) -> MoeCausalLMOutputWithPast:
    """transformers 5 names the cache field `cache`, 4.x `past_key_values`."""
    fields = MoeCausalLMOutputWithPast.__dataclass_fields__
    key = "cache" if "cache" in fields else "past_key_values"
    return MoeCausalLMOutputWithPast(loss=loss, aux_loss=aux_loss, logits=logits, **{key: cache})


def realign_parameters(model: torch.nn.Module, alignment: int = 16) -> int:
    """Give every parameter whose storage is not `alignment`-byte aligned a fresh (aligned) copy.

    Weights loaded from a memory-mapped safetensors file start wherever the file's header ends; grouped_mm
    needs 16-byte aligned operands, so without this a loaded model silently dropped to the per-expert loop.
    Returns how many parameters were copied. Tied parameters stay tied (the Parameter object is kept)."""
    moved = 0
    with torch.no_grad():
        for p in model.parameters():
            if p.data_ptr() % alignment:
                p.data = p.data.clone(memory_format=torch.contiguous_format)
                moved += 1
    return moved


def hf_tokenizer(tokenizer: Any) -> PreTrainedTokenizerFast:
    """A `tokenizers.Tokenizer` as a transformers fast tokenizer with `data.tokenizer.EOS` as EOS (and pad).

    `model_max_length` is left unset (the model's limit is config.max_position_embeddings), so that
    evaluating long texts in windows does not warn."""
    if isinstance(tokenizer, PreTrainedTokenizerFast):
        return tokenizer
    eos_id(tokenizer)  # DataError naming the token when it is missing
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS, pad_token=EOS)


def save_hf(model: MoETransformer, tokenizer: Any, out_dir: str | Path) -> Path:
    """Write a Hugging Face folder (config.json, model.safetensors, tokenizer files) for `model`."""
    tok = hf_tokenizer(tokenizer)
    hf = CompeteSMoEForCausalLM.from_transformer(model, eos_token_id=tok.eos_token_id)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


def is_hf_folder(path: str | Path) -> bool:
    """True for a folder holding a `competesmoe` Hugging Face export (config.json with our model_type)."""
    import json
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return False
    try:
        return json.loads(cfg.read_text()).get("model_type") == MODEL_TYPE
    except (OSError, ValueError):
        return False


def load_hf(path: str | Path, device: str = "cpu") -> tuple[CompeteSMoEForCausalLM, PreTrainedTokenizerFast]:
    """(model in eval mode, tokenizer) from an exported folder."""
    from transformers import AutoTokenizer
    if not is_hf_folder(path):
        raise FileNotFoundError(f"{path}: not a CompeteSMoE Hugging Face folder (no config.json with "
                                f"model_type {MODEL_TYPE!r}); export one with `competesmoe export`")
    model = CompeteSMoEForCausalLM.from_pretrained(str(path)).to(device).eval()
    return model, AutoTokenizer.from_pretrained(str(path))


def register() -> None:
    """Register with AutoConfig / AutoModelForCausalLM (idempotent)."""
    AutoConfig.register(MODEL_TYPE, CompeteSMoEConfig, exist_ok=True)
    AutoModelForCausalLM.register(CompeteSMoEConfig, CompeteSMoEForCausalLM, exist_ok=True)


register()
