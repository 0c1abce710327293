"""The generate CLI: bad arguments are argparse errors (exit 2, nothing printed on stdout) and an
explicit --tokenizer is used or refused, never silently replaced by the byte tokenizer."""
import pytest
import torch

from mptkernels.generate import ByteTokenizer, main
from mptkernels.models import MPTConfig, MPTForCausalLM


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("tiny")
    MPTForCausalLM(MPTConfig(d_model=32, n_heads=4, n_layers=1, max_seq_len=16, vocab_size=256)).save_pretrained(str(d))
    return str(d)


def _fails(capsys, argv, match):
    with pytest.raises(SystemExit) as e:
        main(argv)
    out, err = capsys.readouterr()
    assert e.value.code == 2 and "error:" in err and match in err, err
    assert out == ""  # refused before printing the prompt


def _hf_tokenizer(path):
    pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel({"[UNK]": 0, "hello": 1, "world": 2}, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]").save_pretrained(str(path))


def test_an_explicit_tokenizer_is_used_or_refused(model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a lookup on the Hub would fail, not hang
    base = ["--model", model_dir, "--prompt", "hello", "--max-new-tokens", "2", "--device", "cpu"]
    _fails(capsys, base + ["--tokenizer", str(tmp_path / "nonexistent_tok")], "--tokenizer")
    _fails(capsys, base + ["--tokenizer", "nonexistent_tok"], "nonexistent_tok does not exist")
    _fails(capsys, base + ["--tokenizer", model_dir], "holds no tokenizer")  # a directory without one
    # no --tokenizer and none in the model directory: the byte tokenizer, as documented
    out = main(base)
    assert out[0, :5].tolist() == ByteTokenizer().encode("hello")
    capsys.readouterr()
    _hf_tokenizer(tmp_path / "tok")
    out = main(base + ["--tokenizer", str(tmp_path / "tok")])
    assert out[0, :1].tolist() == [1]  # "hello" is one word of the HF tokenizer, not five bytes


@pytest.mark.parametrize("extra, match", [
    (["--top-k", "0", "--temperature", "1"], "argument --top-k: expected an integer >= 1"),
    (["--top-p", "-0.5", "--temperature", "1"], "argument --top-p: expected a number in (0, 1]"),
    (["--top-p", "1.5"], "argument --top-p"),
    (["--temperature", "-1"], "argument --temperature: expected a number >= 0"),
    (["--temperature", "nan"], "argument --temperature"),
    (["--max-new-tokens", "0"], "argument --max-new-tokens: expected an integer >= 1"),
    (["--max-new-tokens", "-3"], "argument --max-new-tokens"),
    (["--device", "foo"], "--device: expected cpu, cuda or cuda:N, got 'foo'"),
    (["--prompt", "x" * 17], "--prompt is 17 tokens but the model's max_seq_len is 16"),
], ids=str)
def test_bad_arguments_are_argparse_errors(model_dir, capsys, extra, match):
    _fails(capsys, ["--model", model_dir, "--prompt", "hi", "--device", "cpu", *extra], match)


def test_missing_model_and_unavailable_device(model_dir, tmp_path, capsys):
    _fails(capsys, ["--model", str(tmp_path / "nope"), "--prompt", "hi"], "does not exist")
    _fails(capsys, ["--model", str(tmp_path), "--prompt", "hi"], "holds no config.json")
    (tmp_path / "config.json").write_text(open(f"{model_dir}/config.json").read())
    _fails(capsys, ["--model", str(tmp_path), "--prompt", "hi"], "no *.safetensors")  # config but no weights
    if not torch.cuda.is_available():
        _fails(capsys, ["--model", model_dir, "--prompt", "hi", "--device", "cuda"], "CUDA is not available")
    else:
        n = torch.cuda.device_count()
        _fails(capsys, ["--model", model_dir, "--prompt", "hi", "--device", f"cuda:{n}"], "CUDA devices")
