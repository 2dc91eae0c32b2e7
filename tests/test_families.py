"""model/families.py and model/pretrained.py: one loader for every family's checkpoint (the family recorded in
config.yaml, or inferred for older configs), EMA weights, the family check; pretrain_wm.py's family rule; and the
lazy config registries of megatransformer_utils.ConfigRegistry."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

import megatransformer_utils
from megatransformer_utils import ConfigRegistry, MegaTransformerConfig, UnknownConfigName
from model import build_model, load_pretrained, save_pretrained
from model.audio.diffusion import AudioDiffusionConfig
from model.audio.vae import AudioVAEConfig
from model.audio.vocoders import model_config_lookup as vocoder_lookup
from model.audio.vocoders.config import VocoderConfig
from model.diffusion import EMA
from model.families import FAMILIES, family_of, select_family
from model.image.diffusion import model_config_lookup as dit_lookup
from model.image.vae import ImageVAEConfig
from model.image.vae import model_config_lookup as vae_lookup
from model.megatransformer_causal import lookup as causal_lookup
from model.megatransformer_recurrent import lookup as recurrent_lookup
from model.multimodal.config import MultimodalConfig

REPO = Path(__file__).resolve().parent.parent
TINY_CONFIGS = {"causal": causal_lookup["tiny"], "recurrent": recurrent_lookup["recurrent_tiny"],
                "vocoder": vocoder_lookup["tiny_lightheaded_freq_domain_vocoder"], "image_vae": vae_lookup["tiny"],
                "image_diffusion": dit_lookup["tiny_dit"], "audio_vae": AudioVAEConfig.from_name("tiny"),
                "audio_diffusion": AudioDiffusionConfig.from_name("tiny_dit"),
                "multimodal": MultimodalConfig.from_name("tiny")}


def saved(family: str, directory: Path, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = build_model(TINY_CONFIGS[family])
    with torch.no_grad():
        for parameter in model.parameters():  # DiT zero-initialises its output: make every weight count
            parameter.add_(0.01 * torch.randn_like(parameter))
    save_pretrained(model, directory)
    return model


def assert_same_weights(loaded: torch.nn.Module, reference: torch.nn.Module) -> None:
    expected = reference.state_dict()
    assert loaded.state_dict().keys() == expected.keys()
    for name, tensor in loaded.state_dict().items():
        torch.testing.assert_close(tensor, expected[name], rtol=0, atol=0, msg=name)


def test_every_family_has_a_tiny_config_here():
    assert set(FAMILIES) == set(TINY_CONFIGS)


@pytest.mark.parametrize("family", sorted(TINY_CONFIGS))
def test_load_pretrained_reads_every_family_by_its_recorded_model_family(family, tmp_path):
    model = saved(family, tmp_path / "checkpoint")
    assert yaml.safe_load((tmp_path / "checkpoint" / "config.yaml").read_text())["model_family"] == family
    loaded = load_pretrained(tmp_path / "checkpoint")
    reference = model.vocoder if family == "vocoder" else model  # a vocoder trains inside its loss wrapper
    assert type(loaded) is type(reference) and not loaded.training
    assert loaded.config == reference.config
    assert_same_weights(loaded, reference)


@pytest.mark.parametrize("family", ["vocoder", "image_vae", "image_diffusion", "causal"])
def test_a_config_yaml_without_model_family_is_inferred_from_its_keys(family, tmp_path):
    model = saved(family, tmp_path / "old")
    path = tmp_path / "old" / "config.yaml"
    values = yaml.safe_load(path.read_text())
    del values["model_family"]  # as vocoder, VAE and DiT checkpoints were written before the field existed
    path.write_text(yaml.safe_dump(values, sort_keys=False))
    assert family_of(values) == family
    loaded = load_pretrained(tmp_path / "old")
    assert loaded.config.model_family == family
    assert_same_weights(loaded, model.vocoder if family == "vocoder" else model)


def test_family_of_rejects_an_unknown_family_and_keys_no_config_class_has():
    with pytest.raises(ValueError, match="'speech_codec' is not a known family"):
        family_of({"model_family": "speech_codec"})
    with pytest.raises(ValueError, match="fit no config class: add model_family"):
        family_of({"hidden_size": 8, "vocoder_type": "freq_domain"})
    with pytest.raises(ValueError, match="fit several config classes"):
        family_of({"name": "x"})


def test_a_config_refuses_a_family_of_another_class():
    with pytest.raises(ValueError, match="'model_family' must be one of vocoder for a VocoderConfig, got 'causal'"):
        VocoderConfig(model_family="causal")
    assert ImageVAEConfig().model_family == "image_vae"


def test_load_pretrained_checks_the_family_the_caller_wants(tmp_path):
    saved("image_vae", tmp_path / "vae")
    with pytest.raises(ValueError, match="holds a image_vae model .* not a vocoder one"):
        load_pretrained(tmp_path / "vae", family="vocoder")
    assert load_pretrained(tmp_path / "vae", family=("image_vae", "vocoder")).config.model_family == "image_vae"


def test_load_pretrained_reads_the_ema_weights_when_asked(tmp_path):
    model = saved("image_diffusion", tmp_path / "checkpoint")
    ema = EMA(model, decay=0.5, warmup=False)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(3.0)
    ema.update(model)  # shadow = (p + 3p) / 2 = 2p
    ema.save(tmp_path / "checkpoint")
    loaded = load_pretrained(tmp_path / "checkpoint", ema=True)
    for name, parameter in loaded.named_parameters():
        torch.testing.assert_close(parameter, ema.shadow[name], msg=name)
    assert not torch.equal(next(loaded.parameters()), next(load_pretrained(tmp_path / "checkpoint").parameters()))
    saved("image_diffusion", tmp_path / "without_ema")
    with pytest.raises(FileNotFoundError, match="ema.safetensors not found"):
        load_pretrained(tmp_path / "without_ema", ema=True)


def test_load_pretrained_needs_config_and_weights(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.yaml and model.safetensors"):
        load_pretrained(tmp_path)
    saved("vocoder", tmp_path / "checkpoint")
    (tmp_path / "checkpoint" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors not found"):
        load_pretrained(tmp_path / "checkpoint", family="vocoder")


# ----- pretrain_wm.py's family rule -----

def test_select_family_follows_the_name_or_the_recorded_family():
    assert select_family(causal_lookup["tiny"]) == "causal"
    assert select_family(recurrent_lookup["recurrent_tiny"]) == "recurrent"
    assert select_family(causal_lookup["tiny"].with_overrides(["model_family=recurrent"])) == "recurrent"
    assert select_family(causal_lookup["tiny"].with_overrides(["name=my_recurrent_try"])) == "recurrent"
    assert select_family(MegaTransformerConfig(name="custom")) == "causal"


# ----- registries -----

def write_configs(root: Path) -> Path:
    configs = root / "configs"
    (configs / "vocoder").mkdir(parents=True)
    (configs / "vocoder" / "good.yaml").write_text("vocoder_type: splitband\n")
    (configs / "vocoder" / "broken.yaml").write_text("vocoder_type: [unclosed\n")
    (configs / "image_vae").mkdir()
    (configs / "image_vae" / "small.yaml").write_text("latent_channels: 8\n")
    return configs


def test_a_registry_parses_a_file_only_when_its_name_is_looked_up(tmp_path):
    registry = ConfigRegistry(VocoderConfig, config_dir=write_configs(tmp_path))
    assert list(registry) == ["broken", "good"] and len(registry) == 2 and "good" in registry
    assert registry["good"].vocoder_type == "splitband" and registry["good"].model_family == "vocoder"
    with pytest.raises(ValueError, match="broken.yaml is not valid YAML"):
        registry["broken"]
    with pytest.raises(UnknownConfigName, match="unknown config name 'tiny'.*available: broken, good"):
        registry["tiny"]
    assert registry.get("tiny") is None  # a KeyError too, as a Mapping's lookups expect
    (tmp_path / "configs" / "vocoder" / "later.yaml").write_text("n_mels: 64\n")
    assert registry["later"].n_mels == 64  # the folder is read at each access


def test_the_registries_the_docs_name_are_views_of_the_configs_folder(monkeypatch, tmp_path):
    for registry, family in ((causal_lookup, "causal"), (recurrent_lookup, "recurrent"), (vocoder_lookup, "vocoder"),
                             (vae_lookup, "image_vae"), (dit_lookup, "image_diffusion")):
        assert isinstance(registry, ConfigRegistry)
        assert sorted(registry) == sorted(path.stem for path in (REPO / "configs" / family).glob("*.yaml"))
    monkeypatch.setattr(megatransformer_utils, "CONFIG_DIR", write_configs(tmp_path))
    assert list(vocoder_lookup) == ["broken", "good"] and list(vae_lookup) == ["small"]
    assert vae_lookup["small"].latent_channels == 8


def test_a_broken_yaml_breaks_neither_the_import_nor_the_other_names(tmp_path):
    configs = write_configs(tmp_path)
    (configs / "causal").mkdir()
    (configs / "causal" / "broken_lm.yaml").write_text("hidden_size: [\n")
    (configs / "causal" / "fine_lm.yaml").write_text("hidden_size: 64\nn_heads: 4\n")
    program = textwrap.dedent(f"""
        import megatransformer_utils
        megatransformer_utils.CONFIG_DIR = megatransformer_utils.Path({str(configs)!r})
        import model, model.image.pipeline
        from model.audio.vocoders import model_config_lookup
        from model.megatransformer_causal import lookup
        print(sorted(model_config_lookup), model_config_lookup["good"].vocoder_type, lookup["fine_lm"].hidden_size)
    """)
    result = subprocess.run([sys.executable, "-c", program], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["['broken',", "'good']", "splitband", "64"]
