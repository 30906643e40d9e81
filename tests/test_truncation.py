"""Rows longer than the model's context: cut at the end of their completion (their prompt kept whole), dropped
when the prompt alone fills it, counted in one line and in summary.json, or refused with truncation=error."""
import json
import types

import pytest

from posttrain import data
from posttrain.cli import main
from posttrain.data import RowLimit, encode_pair, encode_rows
from posttrain.errors import UserError
from posttrain.losses.sft import IGNORE
from posttrain.training import TrainingConfig
from tests.conftest import random_model

CONTEXT = 64


@pytest.fixture(scope="module")
def short_context_model_dir(tmp_path_factory, tokenizer):
    """A random tiny Llama whose context is CONTEXT positions."""
    path = tmp_path_factory.mktemp("short-context-model")
    model = random_model(tokenizer)
    model.config.max_position_embeddings = CONTEXT
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def long_completion(n: int) -> str:
    return "A:" + "".join(f" {i % 10}" for i in range(n))  # each digit with its space is one token


def test_a_long_row_keeps_its_prompt_and_the_start_of_its_completion(tokenizer, capsys):
    pairs = [("Q: 1+2\n", "A: 3"), ("Q: 12+34\n", long_completion(100))]
    encoded = encode_rows(tokenizer, pairs, RowLimit(20))
    short, long = encoded.rows
    assert short == encode_pair(tokenizer, *pairs[0])  # within the limit: as encode_pair makes it
    full_ids, full_labels = encode_pair(tokenizer, *pairs[1])
    assert long == (full_ids[:20], full_labels[:20]) and len(full_ids) > 100
    prompt_length = full_labels.index(next(x for x in full_labels if x != IGNORE))
    assert long[1][:prompt_length] == [IGNORE] * prompt_length and IGNORE not in long[1][prompt_length:]
    assert (encoded.kept, encoded.counts) == ([0, 1], {"truncated_rows": 1, "dropped_rows": 0})
    line, = capsys.readouterr().out.splitlines()
    assert "of 2 training rows, 1 longer than max_length=20 tokens had their completion cut and 0" in line


def test_a_row_whose_prompt_alone_fills_the_limit_is_dropped(tokenizer):
    pairs = [("Q: 1+2\n" * 10, "A: 3"), ("Q: 1+2\n", "A: 3"), ("Q: 12+34\n", long_completion(40))]
    encoded = encode_rows(tokenizer, pairs, RowLimit(12))
    assert encoded.kept == [1, 2] and encoded.counts == {"truncated_rows": 1, "dropped_rows": 1}
    assert [len(ids) for ids, _ in encoded.rows] == [len(encode_pair(tokenizer, *pairs[1])[0]), 12]


def test_every_prompt_over_the_limit_is_one_line_not_an_empty_dataset(tokenizer):
    with pytest.raises(UserError, match="every training row's prompt is at least max_length=4 tokens"):
        encode_rows(tokenizer, [("Q: 12+34\n", "A: 46")] * 3, RowLimit(4))


def test_truncation_error_names_the_first_long_row_and_its_length(tokenizer):
    pairs = [("Q: 1+2\n", "A: 3"), ("Q: 5+5\n", long_completion(30)), ("Q: 6+6\n", long_completion(50))]
    length = len(encode_pair(tokenizer, *pairs[1])[0])
    with pytest.raises(UserError) as raised:
        encode_rows(tokenizer, pairs, RowLimit(16, "error"))
    message = str(raised.value)
    assert f"training row 1 (counted from 0; prompt 'Q: 5+5\\n'...) is {length} tokens, over max_length=16" in message
    assert "truncation=truncate" in message and "\n" not in message


def test_the_limit_is_the_models_context_unless_max_length_is_set(tokenizer):
    model = random_model(tokenizer)  # 256 positions
    assert RowLimit.of(TrainingConfig(), model) == RowLimit(256, "truncate")
    assert RowLimit.of(TrainingConfig(max_length=32, truncation="error"), model) == RowLimit(32, "error")
    assert RowLimit.of(TrainingConfig(), types.SimpleNamespace(config=object())) == RowLimit(None)
    rows = encode_rows(tokenizer, [("Q: 1+2\n", long_completion(300))], RowLimit.of(TrainingConfig(), model)).rows
    assert len(rows[0][0]) == 256


def test_the_config_refuses_an_unknown_truncation_and_a_negative_length():
    with pytest.raises(UserError, match="'truncation' must be one of truncate, error, got 'cut'"):
        TrainingConfig(truncation="cut").validate()
    with pytest.raises(UserError, match="'max_length' must be >= 0, got -1"):
        TrainingConfig(max_length=-1).validate()


def test_many_rows_show_a_progress_bar(tokenizer, monkeypatch, capsys):
    monkeypatch.setattr(data, "MANY_ROWS", 3)
    encode_rows(tokenizer, [("Q: 1+2\n", "A: 3")] * 3)
    assert "tokenizing" not in capsys.readouterr().err
    encode_rows(tokenizer, [("Q: 1+2\n", "A: 3")] * 4)
    assert "tokenizing" in capsys.readouterr().err


def test_dpo_pairs_stay_aligned_when_a_prompt_is_dropped(tokenizer):
    from posttrain.methods.rl.dpo import encode_records

    fields = [("Q: 1+2\n", "A: 3", "A: 4"), ("Q: 1+2\n" * 10, "A: 3", "A: 4"), ("Q: 2+2\n", long_completion(40), "A: 5")]
    records = [types.SimpleNamespace(prompt=p, chosen=c, rejected=r) for p, c, r in fields]
    pairs, counts = encode_records(tokenizer, records, RowLimit(12))
    assert counts == {"truncated_rows": 1, "dropped_rows": 2}  # record 1's two rows, record 2's chosen row
    assert pairs[0] == (encode_pair(tokenizer, "Q: 1+2\n", "A: 3"), encode_pair(tokenizer, "Q: 1+2\n", "A: 4"))
    assert len(pairs) == 2 and pairs[1][1] == encode_pair(tokenizer, "Q: 2+2\n", "A: 5")


def sft_data(path, rows: int = 20) -> str:
    path.write_text("".join(json.dumps({"prompt": f"Q: {i}+1\n", "completion": long_completion(80)}) + "\n"
                            for i in range(rows)))
    return str(path)


def test_sft_truncates_rows_past_the_models_context_and_counts_them(tmp_path, short_context_model_dir, capsys):
    out = tmp_path / "run"
    code = main(["sft", "--data", sft_data(tmp_path / "train.jsonl"), "--model", str(short_context_model_dir),
                 "--output-dir", str(out), "steps=2", "batch_size=4"])
    assert code == 0
    assert f"18 longer than max_length={CONTEXT} tokens had their completion cut" in capsys.readouterr().out
    metrics = json.loads((out / "summary.json").read_text())["metrics"]
    assert metrics["truncated_rows"] == 18 and metrics["dropped_rows"] == 0  # 20 records, 2 held out
    assert metrics["train_tokens"] == 18 * CONTEXT


def test_sft_with_truncation_error_refuses_the_first_long_row(tmp_path, short_context_model_dir, capsys):
    code = main(["sft", "--data", sft_data(tmp_path / "train.jsonl"), "--model", str(short_context_model_dir),
                 "--output-dir", str(tmp_path / "run"), "steps=2", "batch_size=4", "truncation=error"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(err) == 1
    assert err[0].startswith("error: training row 0 (counted from 0") and f"over max_length={CONTEXT}" in err[0]
