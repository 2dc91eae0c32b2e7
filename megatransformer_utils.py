"""MegaTransformerConfig: the one config every model in this repo is built from.

A config is a dataclass backed by YAML files in `configs/<family>/<name>.yaml`:

    config = MegaTransformerConfig.from_name("gpt2_small")          # configs/causal/gpt2_small.yaml
    config = MegaTransformerConfig.from_yaml("my.yaml")             # may say `extends: gpt2_small`
    config = config.with_overrides(["n_layers=4", "ffn_type=moe"])  # what `--set KEY=VALUE` does
    config.to_yaml("runs/x/config.yaml")                            # the exact resolved config

Every way in runs the same validation: an unknown key, a value of the wrong type or an impossible
combination raises `ValueError` naming the key and what would be valid. Fields left `null` that
follow from others (`n_query_groups`, `d_queries`, `d_values`, `rotary_dim`) are resolved on
construction, so a saved config always holds the values the model was built with.

`YamlConfig` is the machinery under it, shared by every config family (vocoders, VAEs, DiTs): a
subclass is a dataclass of typed fields with defaults, names the `configs/` subfolders its names
resolve in, and adds its own value checks in `validate()`. Every config records its `model_family`
(one of those subfolders), which is how model/families.py knows what a checkpoint's config.yaml builds.

`ConfigRegistry` is the one registry mechanism: a read-only mapping name → config over the YAML files
of some `configs/` subfolders, which parses a file only when its name is looked up (so a broken YAML
breaks only its own name). The registries the docs name are instances of it:

    lookup = ConfigRegistry(MegaTransformerConfig, ("causal",))       # model/megatransformer_causal.py
    model_config_lookup = VocoderConfig.registry()                     # model/audio/vocoders/vocoders.py
"""

import dataclasses
import difflib
from collections.abc import Mapping
import re
import types
import typing
from pathlib import Path
from typing import ClassVar, Optional

import yaml

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


class _YamlLoader(yaml.SafeLoader):
    """SafeLoader that also reads YAML 1.2 floats: PyYAML (YAML 1.1) loads `5e5` and `1e-5` as strings."""


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def _load_yaml(text: str):
    return yaml.load(text, Loader=_YamlLoader)


@dataclasses.dataclass
class YamlConfig:
    """A dataclass config read from and written to YAML, validated on construction.

    Subclasses set FAMILIES (the `configs/` subfolders their names resolve in, which are also the model
    families the config may build), CHOICES (field → allowed values), DERIVED (field resolved from others when
    null → the fields it follows), and may override resolve_derived() and validate(), both called by
    __post_init__ after the type check.
    """

    FAMILIES: ClassVar[tuple] = ()
    CHOICES: ClassVar[dict] = {}
    DERIVED: ClassVar[dict] = {}

    name: Optional[str] = None
    model_family: Optional[str] = None  # one of FAMILIES (default the first): the family a checkpoint loads as

    def __post_init__(self):
        _check_types(self)
        _resolve_model_family(self)
        self.resolve_derived()
        for key, choices in self.CHOICES.items():
            _require(getattr(self, key) in choices,
                     f"config key '{key}' must be one of {', '.join(map(str, choices))}, got {getattr(self, key)!r}")
        self.validate()

    def resolve_derived(self) -> None:
        """Fill the DERIVED fields left null."""

    def validate(self) -> None:
        """Raise ValueError for impossible values or combinations."""

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, values: dict):
        if not isinstance(values, dict):
            raise ValueError(f"a config must be a mapping of keys to values, got {type(values).__name__}")
        unknown = [key for key in values if key not in cls.field_names()]
        if unknown:
            raise ValueError("; ".join(_unknown_key_message(cls, key) for key in unknown))
        return cls(**values)

    @classmethod
    def from_yaml(cls, path):
        values = _read_yaml_with_extends(Path(path), seen=(), families=cls.FAMILIES)
        values.setdefault("name", Path(path).stem)
        return cls.from_dict(values)

    @classmethod
    def from_name(cls, name: str):
        """Load `configs/<family>/<name>.yaml` (one of FAMILIES); a path to a YAML file works too."""
        return cls.from_yaml(resolve_config_path(name, cls.FAMILIES))

    @classmethod
    def registry(cls) -> "ConfigRegistry":
        """Every config of this class's FAMILIES, by name (see ConfigRegistry)."""
        return ConfigRegistry(cls, cls.FAMILIES)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self, path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    def with_overrides(self, assignments: list[str]):
        """Apply `KEY=VALUE` strings (from `--set`), each value typed by its field.

        Derived fields are re-resolved from the new values unless also set explicitly.
        """
        values = self.to_dict()
        explicit = {}
        for assignment in assignments:
            key, sep, text = assignment.partition("=")
            key = key.strip()
            if not sep or not key:
                raise ValueError(f"override '{assignment}' must look like KEY=VALUE, e.g. n_layers=4")
            if key not in values:
                raise ValueError(_unknown_key_message(type(self), key))
            explicit[key] = _parse_override(type(self), key, text.strip())
        for derived, source in self.DERIVED.items():
            if derived not in explicit and any(s in explicit for s in source):
                values[derived] = None
        values.update(explicit)
        return type(self).from_dict(values)


class UnknownConfigName(KeyError, ValueError):
    """A name no YAML file of a registry has: a KeyError for Mapping users, a ValueError for the CLIs."""

    def __str__(self) -> str:
        return str(self.args[0])


class ConfigRegistry(Mapping):
    """Registry name → config of `config_class`, a read-only view over configs/<family>/<name>.yaml for the given
    families (default config_class.FAMILIES). The folders are listed on every access and a file is parsed only
    when its name is looked up, so a new file shows up at once and a broken one raises (ValueError naming it) for
    its own name only. `config_dir` defaults to megatransformer_utils.CONFIG_DIR, read at each access."""

    def __init__(self, config_class: type, families: tuple | None = None, config_dir: Path | None = None):
        self.config_class = config_class
        self.families = tuple(families) if families is not None else config_class.FAMILIES
        self.config_dir = config_dir

    def _paths(self) -> dict[str, list[Path]]:
        return _config_paths_by_name(self.families, self.config_dir)

    def path(self, name: str) -> Path:
        """The YAML file of `name` (UnknownConfigName, listing the names, when there is none)."""
        return _path_of_name(name, self._paths())

    def __getitem__(self, name: str):
        return self.config_class.from_yaml(self.path(name))

    def __contains__(self, name) -> bool:
        return name in self._paths()

    def __iter__(self):
        return iter(sorted(self._paths()))

    def __len__(self) -> int:
        return len(self._paths())

    def __repr__(self) -> str:
        return f"ConfigRegistry({self.config_class.__name__}, {', '.join(self.families)}: {', '.join(self)})"


CHOICES = {
    "model_family": ("causal", "recurrent"),
    "ffn_type": ("mlp", "moe"),
    "intermediate_activation": ("gelu", "gelu_tanh", "relu", "relu2", "silu", "swiglu", "geglu", "reglu"),
    "norm_type": ("layernorm", "rmsnorm"),
    "recurrent_adapter": ("sum", "gate", "linear"),
    "recurrent_init_state": ("zero", "normal", "like-init", "embed"),
    "recurrent_exit_criteria": ("none", "kl_divergence", "entropy_diff", "latent_diff", "argmax_stability", "cosine"),
}


@dataclasses.dataclass
class MegaTransformerConfig(YamlConfig):
    """Architecture of a transformer-family model. See configs/causal and configs/recurrent."""

    FAMILIES: ClassVar[tuple] = ("causal", "recurrent")
    CHOICES: ClassVar[dict] = CHOICES
    # fields resolved in resolve_derived() and the fields they follow
    DERIVED: ClassVar[dict] = {
        "n_query_groups": ("n_heads",),
        "d_queries": ("hidden_size", "n_heads"),
        "d_values": ("hidden_size", "n_heads", "d_queries"),
        "rotary_dim": ("hidden_size", "n_heads", "d_queries", "use_rotary_embedding"),
    }

    model_family: str = "causal"

    # sizes
    vocab_size: int = 50257
    max_position_embeddings: int = 1024
    hidden_size: int = 768
    n_layers: int = 12
    intermediate_size: int = 3072

    # attention
    n_heads: int = 12
    n_query_groups: Optional[int] = None  # key/value heads: n_heads = MHA, 1 = MQA, between = GQA
    d_queries: Optional[int] = None  # query/key head size; default hidden_size // n_heads
    d_values: Optional[int] = None  # value head size; default d_queries
    use_qkv_bias: bool = False
    use_attn_output_bias: bool = False
    attention_dropout: float = 0.0
    sliding_window: Optional[int] = None  # attend to at most this many most recent positions

    # positions
    use_positional_embedding: bool = False  # learned absolute (GPT-2)
    use_sinusoidal_embedding: bool = False  # fixed absolute (Vaswani et al.)
    use_rotary_embedding: bool = True
    rotary_base: float = 10000.0
    rotary_dim: Optional[int] = None  # rotated dims per head; default d_queries (full rotary)
    use_alibi_bias: bool = False

    # feed-forward
    ffn_type: str = "mlp"
    intermediate_activation: str = "swiglu"
    use_ffn_bias: bool = False
    n_experts: int = 8
    n_experts_per_token: int = 2
    moe_aux_loss_weight: float = 0.01
    moe_z_loss_weight: float = 0.001

    # normalization: pre norms feed a sublayer; post norms follow its residual add (sandwich/post-LN)
    norm_type: str = "rmsnorm"
    norm_eps: float = 1e-5
    pre_attn_norm: bool = True
    post_attn_norm: bool = False
    pre_ffn_norm: bool = True
    post_ffn_norm: bool = False
    use_final_norm: bool = True

    # embeddings, init, special tokens
    hidden_dropout: float = 0.0
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    scale_residual_init: bool = True  # GPT-2: residual projections get std / sqrt(2 * n_layers)
    pad_token_id: Optional[int] = None
    bos_token_id: Optional[int] = None
    eos_token_id: Optional[int] = None

    # recurrent depth (used by model/megatransformer_recurrent.py)
    n_prelude_layers: int = 2
    n_recurrent_layers: int = 4
    n_coda_layers: int = 2
    recurrent_adapter: str = "linear"
    recurrent_init_state: str = "like-init"
    recurrent_mean_thinking_steps: int = 32
    recurrent_thinking_steps_sigma: float = 0.5  # log-normal std of the Poisson rate
    recurrent_backprop_depth: int = 8
    recurrent_depth_per_rank: bool = False  # each rank draws its own depth per step (default: all ranks alike)
    recurrent_max_thinking_steps: int = 64
    recurrent_exit_criteria: str = "kl_divergence"
    recurrent_exit_criteria_threshold: float = 5e-4

    def resolve_derived(self) -> None:
        _require(self.n_heads >= 1, f"config key 'n_heads' must be a positive integer, got {self.n_heads}")
        if self.n_query_groups is None:
            self.n_query_groups = self.n_heads
        if self.d_queries is None:
            if self.hidden_size % self.n_heads:
                raise ValueError(
                    f"hidden_size={self.hidden_size} is not divisible by n_heads={self.n_heads}: "
                    "set d_queries (and d_values) explicitly or pick a divisible n_heads"
                )
            self.d_queries = self.hidden_size // self.n_heads
        if self.d_values is None:
            self.d_values = self.d_queries
        if self.use_rotary_embedding and self.rotary_dim is None:
            self.rotary_dim = self.d_queries

    def validate(self) -> None:
        _check_values(self)

    # ----- derived -----
    @property
    def is_gated(self) -> bool:
        """True for GLU activations, whose input projection is twice as wide (gate and value)."""
        return self.intermediate_activation in ("swiglu", "geglu", "reglu")


def _unknown_key_message(config_class, key) -> str:
    close = difflib.get_close_matches(str(key), config_class.field_names(), n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else f"; see {config_class.__name__} for valid keys"
    return f"unknown config key '{key}'{hint}"


def _parse_override(config_class, key: str, text: str):
    """The value of `KEY=text`: YAML-parsed, except that a string field keeps the text as written
    (so `name=2024` or `name=yes` stay strings); empty or `null` is None."""
    if text in ("", "null", "~"):
        return None
    field_type = typing.get_type_hints(config_class)[key]
    if str in _allowed_types(field_type):
        return text
    try:
        return _load_yaml(text)
    except yaml.YAMLError as error:
        raise ValueError(f"override {key}={text}: the value is not valid YAML ({error})") from None


def _resolve_model_family(config: YamlConfig) -> None:
    """model_family defaults to the first of FAMILIES and must be one of them (when the class names any)."""
    if not config.FAMILIES:
        return
    if config.model_family is None:
        config.model_family = config.FAMILIES[0]
    _require(config.model_family in config.FAMILIES,
             f"config key 'model_family' must be one of {', '.join(config.FAMILIES)} for a "
             f"{type(config).__name__}, got {config.model_family!r}")


def _config_paths_by_name(families: tuple = (), config_dir: Path | None = None) -> dict[str, list[Path]]:
    """Config names → their YAML files, in the given configs/ subfolders (all of them when empty) of config_dir
    (default CONFIG_DIR)."""
    paths = {}
    for path in sorted((config_dir or CONFIG_DIR).glob("*/*.yaml")):
        if families and path.parent.name not in families:
            continue
        paths.setdefault(path.stem, []).append(path)
    return paths


def resolve_config_path(name, families: tuple = ()) -> Path:
    """A registry name (`gpt2_small`, looked up in the `families` subfolders of configs/) or a path to a
    YAML file → the YAML file's path."""
    as_path = Path(name)
    if as_path.suffix in (".yaml", ".yml"):
        if not as_path.is_file():
            raise ValueError(f"config file {as_path} does not exist")
        return as_path
    return _path_of_name(name, _config_paths_by_name(families))


def _path_of_name(name, names: dict[str, list[Path]]) -> Path:
    """The one YAML file of registry name `name` among `names` (name → files); UnknownConfigName or ValueError."""
    if name not in names:
        close = difflib.get_close_matches(str(name), list(names), n=3, cutoff=0.4)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise UnknownConfigName(f"unknown config name '{name}': {hint}available: {', '.join(names)}")
    if len(names[name]) > 1:
        raise ValueError(f"config name '{name}' is ambiguous: {', '.join(map(str, names[name]))}; "
                         "pass the path of the YAML file instead")
    return names[name][0]


def _read_yaml_with_extends(path: Path, seen: tuple, families: tuple) -> dict:
    """The mapping in `path` merged over the files it `extends` (by registry name or by a file name
    relative to `path`); `seen` holds the resolved paths of the files that extend this one."""
    if not path.is_file():
        extended_by = f" (extended by {seen[-1]})" if seen else ""
        raise ValueError(f"config file {path} does not exist{extended_by}")
    if path.resolve() in seen:
        chain = " -> ".join(map(str, seen + (path.resolve(),)))
        raise ValueError(f"config {path} extends itself: {chain}")
    try:
        values = _load_yaml(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ValueError(f"config file {path} is not valid YAML: {error}") from None
    if not isinstance(values, dict):
        raise ValueError(f"config file {path} must hold a mapping of keys to values")
    parent = values.pop("extends", None)
    if parent is None:
        return values
    if not isinstance(parent, str):
        raise ValueError(f"'extends' in {path} must be a config name or a YAML file name, got {parent!r}")
    parent_path = path.parent / parent if parent.endswith((".yaml", ".yml")) else resolve_config_path(parent, families)
    merged = _read_yaml_with_extends(parent_path, seen + (path.resolve(),), families)
    merged.pop("name", None)
    merged.update(values)
    return merged


def _allowed_types(annotation) -> tuple:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return tuple(typing.get_args(annotation))
    return (annotation,)


def _check_types(config: YamlConfig) -> None:
    hints = typing.get_type_hints(type(config))
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        allowed = _allowed_types(hints[field.name])
        if value is None and type(None) in allowed:
            continue
        if float in allowed and isinstance(value, int) and not isinstance(value, bool):
            setattr(config, field.name, float(value))
            continue
        if type(value) in allowed:
            continue
        wanted = " or ".join("null" if t is type(None) else t.__name__ for t in allowed)
        raise ValueError(f"config key '{field.name}' must be {wanted}, got {value!r} ({type(value).__name__})")


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _check_values(c: MegaTransformerConfig) -> None:
    for key in ("vocab_size", "max_position_embeddings", "hidden_size", "n_layers", "intermediate_size", "n_heads",
                "n_query_groups", "d_queries", "d_values", "n_experts", "n_experts_per_token"):
        _require(getattr(c, key) >= 1, f"config key '{key}' must be a positive integer, got {getattr(c, key)}")
    for key in ("attention_dropout", "hidden_dropout"):
        _require(0.0 <= getattr(c, key) < 1.0, f"config key '{key}' must be in [0, 1), got {getattr(c, key)}")
    for key in ("norm_eps", "initializer_range", "rotary_base"):
        _require(getattr(c, key) > 0, f"config key '{key}' must be positive, got {getattr(c, key)}")
    _require(c.n_heads % c.n_query_groups == 0,
             f"n_heads={c.n_heads} must be divisible by n_query_groups={c.n_query_groups} "
             f"(valid n_query_groups: {', '.join(str(g) for g in range(1, c.n_heads + 1) if c.n_heads % g == 0)})")
    _require(not (c.use_rotary_embedding and c.use_alibi_bias),
             "use_rotary_embedding and use_alibi_bias cannot both be true: pick one relative position scheme")
    _require(not (c.use_positional_embedding and c.use_sinusoidal_embedding),
             "use_positional_embedding (learned) and use_sinusoidal_embedding cannot both be true")
    if c.use_rotary_embedding:
        _require(0 < c.rotary_dim <= c.d_queries and c.rotary_dim % 2 == 0,
                 f"rotary_dim={c.rotary_dim} must be even and between 2 and d_queries={c.d_queries} "
                 "(rotary_dim defaults to d_queries: with an odd d_queries, set an even rotary_dim)")
    else:
        _require(c.rotary_dim is None, "rotary_dim is set but use_rotary_embedding is false")
    _require(c.n_experts_per_token <= c.n_experts,
             f"n_experts_per_token={c.n_experts_per_token} must be at most n_experts={c.n_experts}")
    _require(not (c.ffn_type == "moe" and c.use_ffn_bias), "use_ffn_bias is not supported with ffn_type=moe")
    _require(c.sliding_window is None or c.sliding_window >= 1, f"sliding_window must be null or >= 1, got {c.sliding_window}")
    if c.use_sinusoidal_embedding:
        _require(c.hidden_size % 2 == 0, f"use_sinusoidal_embedding needs an even hidden_size, got {c.hidden_size}")
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
        token = getattr(c, key)
        _require(token is None or 0 <= token < c.vocab_size, f"{key}={token} must be in [0, vocab_size={c.vocab_size})")
    _require(c.recurrent_mean_thinking_steps >= 1 and c.recurrent_backprop_depth >= 1,
             "recurrent_mean_thinking_steps and recurrent_backprop_depth must be at least 1")
    _require(c.recurrent_max_thinking_steps >= 1, "recurrent_max_thinking_steps must be at least 1")
    _require(c.n_recurrent_layers >= 1, f"config key 'n_recurrent_layers' must be at least 1, got {c.n_recurrent_layers}")
    for key in ("n_prelude_layers", "n_coda_layers", "recurrent_thinking_steps_sigma", "recurrent_exit_criteria_threshold"):
        _require(getattr(c, key) >= 0, f"config key '{key}' must not be negative, got {getattr(c, key)}")
