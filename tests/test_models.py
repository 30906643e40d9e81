"""Loading models: a saved folder goes through the same `--model` path a hub id takes."""
import pytest
import torch

from posttrain.errors import UserError
from posttrain.models import load_model, resolve_model_path


def test_model_saved_in_a_folder_loads_like_a_hub_model(tiny_model_dir, tokenizer):
    model, tok = load_model(str(tiny_model_dir))
    assert tok("Q: 1+2\n")["input_ids"] == tokenizer("Q: 1+2\n")["input_ids"]
    assert tok.pad_token_id is not None and tok.eos_token == "<eos>"
    assert (tiny_model_dir / "model.safetensors").exists()
    ids = torch.tensor([tok("Q: 12+34\n")["input_ids"]])
    assert model(input_ids=ids).logits.shape[-1] == len(tokenizer)


def test_missing_local_path_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_model(str(tmp_path / "no-such-model"))


def test_folder_without_config_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="no config.json"):
        load_model(str(tmp_path))


def test_unknown_embedded_name_lists_the_choices():
    with pytest.raises(UserError, match="posttrain:tiny"):
        resolve_model_path("posttrain:huge")


def test_unreachable_hub_id_is_a_clear_error():
    with pytest.raises(UserError, match="'nobody/no-such-model' is not a local folder, and not in the Hugging Face"):
        load_model("nobody/no-such-model")


def test_tokenizer_without_pad_token_gets_one(tiny_model_dir, tmp_path):
    model, tok = load_model(str(tiny_model_dir))
    tok.pad_token = None
    tok.save_pretrained(tmp_path)
    model.save_pretrained(tmp_path)
    _, reloaded = load_model(str(tmp_path))
    assert reloaded.pad_token == reloaded.eos_token


def test_a_hub_id_the_hub_cannot_confirm_fails_in_one_line_without_retries(monkeypatch):
    """A name shaped like a hub id, not a local folder and not downloaded: an unreachable hub or a missing
    repository is one UserError at once (transformers would retry for about a minute first)."""
    import huggingface_hub
    from huggingface_hub.errors import RepositoryNotFoundError

    def unreachable(name, timeout):
        raise ConnectionError("Name or service not known")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # the suite runs offline; here the hub is asked
    monkeypatch.setattr(huggingface_hub, "model_info", unreachable)
    with pytest.raises(UserError, match="hub cannot be reached"):
        resolve_model_path("models/does-not-exist")

    def missing(name, timeout):
        raise RepositoryNotFoundError.__new__(RepositoryNotFoundError)  # as the hub's 404 raises it

    monkeypatch.setattr(huggingface_hub, "model_info", missing)
    with pytest.raises(UserError, match="has no repository 'someone/nothing'"):
        resolve_model_path("someone/nothing")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="HF_HUB_OFFLINE"):
        resolve_model_path("someone/nothing")
