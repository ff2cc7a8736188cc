"""Bad GGUF input is one line naming the file and the fix, before any model loads: not GGUF, cut
short (in the header or in the tensor data), an architecture or quantization type transformers
cannot load, the `aligndial[gguf]` extra missing. The files are small real GGUFs written with the
`gguf` package's writer. The real model's tests are tests/test_real_model.py."""

import os
import sys

import numpy as np
import pytest

if os.environ.get("ALIGNDIAL_REQUIRE_REAL_MODEL") == "1":
    import gguf  # (CI: a missing extra is a failure, not a skip)
else:
    gguf = pytest.importorskip("gguf", reason="the gguf extra is not installed: pip install 'aligndial[gguf]'")

from aligndial.cli import main  # noqa: E402
from aligndial.cliargs import check_model  # noqa: E402
from aligndial.gguf import check_gguf, is_gguf, read_header  # noqa: E402


def write_gguf(path, arch="llama", kind=None, rows=64):
    """A GGUF file with two tensors: F32, and `kind` (a quantized type) if given."""
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_tensor("token_embd.weight", np.arange(rows * 32, dtype=np.float32).reshape(rows, 32))
    if kind is not None:
        nbytes = gguf.GGML_QUANT_SIZES[kind][1]
        writer.add_tensor("blk.0.attn_q.weight", np.zeros((4, 2 * nbytes), np.uint8), raw_dtype=kind)  # 4 × 2 blocks
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def one_line_error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_a_valid_file_passes_and_its_header_is_read(tmp_path):
    path = write_gguf(tmp_path / "m.gguf", kind=gguf.GGMLQuantizationType.Q4_1)
    header = check_gguf(path)
    assert header.architecture == "llama" and len(header.tensor_types) == 2
    assert is_gguf(str(path)) and not is_gguf(str(tmp_path)) and not is_gguf("org/model")
    check_model("--model", str(path))  # a .gguf passes where a model directory is expected


def test_not_gguf_is_one_line(tmp_path, capsys):
    path = tmp_path / "notes.gguf"
    path.write_text("hello")
    err = one_line_error(capsys, ["generate", "--model", str(path), "--prompt", "Hi"])
    assert f"`--model {path}`: not a GGUF file" in err


def test_missing_file_is_one_line(tmp_path, capsys):
    err = one_line_error(capsys, ["convert", str(tmp_path / "none.gguf"), "--out", str(tmp_path / "out")])
    assert "none.gguf: no such file" in err


@pytest.mark.parametrize("keep, says", [(40, "GGUF header is cut short"), (-100, "the file is truncated")])
def test_truncated_file_is_one_line(tmp_path, capsys, keep, says):
    data = write_gguf(tmp_path / "full.gguf").read_bytes()
    path = tmp_path / "cut.gguf"
    path.write_bytes(data[:keep])
    err = one_line_error(capsys, ["generate", "--ref", str(path), "--aligned", str(path), "--prompt", "Hi"])
    assert f"`--ref {path}`" in err and says in err and "download or copy it again" in err


def test_unsupported_architecture_names_the_supported_ones(tmp_path, capsys):
    path = write_gguf(tmp_path / "r.gguf", arch="rwkv7")
    err = one_line_error(capsys, ["convert", str(path), "--out", str(tmp_path / "out")])
    assert "'rwkv7' is not supported by transformers" in err and "llama" in err and "qwen2" in err


def test_unsupported_quantization_type_names_the_supported_ones(tmp_path, capsys):
    path = write_gguf(tmp_path / "q.gguf", kind=gguf.GGMLQuantizationType.Q8_1)
    err = one_line_error(capsys, ["train", "dpo", "--model", str(path), "--data", "x.jsonl", "--out", str(tmp_path / "o")])
    assert "Q8_1 cannot be dequantized" in err and "Q4_1" in err and "Q8_0" in err


def test_missing_extra_names_the_install_command(tmp_path, capsys, monkeypatch):
    path = write_gguf(tmp_path / "m.gguf")
    monkeypatch.setitem(sys.modules, "gguf", None)  # as if the package were not installed
    err = one_line_error(capsys, ["convert", str(path), "--out", str(tmp_path / "out")])
    assert "needs the `gguf` package: pip install 'aligndial[gguf]'" in err


def test_convert_refuses_an_out_that_is_a_file(tmp_path, capsys):
    path, out = write_gguf(tmp_path / "m.gguf"), tmp_path / "file"
    out.write_text("")
    err = one_line_error(capsys, ["convert", str(path), "--out", str(out)])
    assert "exists and is not a directory" in err


def test_header_of_the_writer_matches_the_gguf_reader(tmp_path):
    """`read_header` (struct, header only) agrees with the gguf package's own reader."""
    path = write_gguf(tmp_path / "m.gguf", kind=gguf.GGMLQuantizationType.Q4_1)
    ours, theirs = read_header(path), gguf.GGUFReader(path)
    assert [int(t.tensor_type) for t in theirs.tensors] == list(ours.tensor_types)
    assert [int(t.data_offset) for t in theirs.tensors] == [ours.data_start + o for o in ours.tensor_offsets]
