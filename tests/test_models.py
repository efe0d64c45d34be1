"""load_model and the built-in tiny model: untied heads survive save/load, FRED-like tokenizer facts, clear errors."""

from __future__ import annotations

import hashlib

import os

import pytest
import torch

from rsg_eval.core.errors import RSGError
from rsg_eval.models.loading import load_model, max_input_tokens, resolve_dtype
from rsg_eval.models.tiny import build_tiny, build_tiny_tokenizer
from rsg_eval.models.untied import declared_untied


def _weights_hash(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------- tiny


def test_tiny_is_deterministic_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    before = torch.rand(1).item()
    torch.manual_seed(123)
    m1, t1 = build_tiny()
    after = torch.rand(1).item()
    m2, t2 = build_tiny()
    assert before == after  # building forks the RNG
    assert _weights_hash(m1) == _weights_hash(m2)
    assert t1.backend_tokenizer.to_str() == t2.backend_tokenizer.to_str()
    m3, _ = build_tiny(seed=1)
    assert _weights_hash(m3) != _weights_hash(m1)


def test_tiny_tokenizer_has_fred_like_special_tokens_and_appends_no_eos():
    tok = build_tiny_tokenizer()
    assert tok.convert_ids_to_tokens([0, 1, 2, 3, 4]) == ["<pad>", "<s>", "</s>", "<unk>", "<mask>"]
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    ids = tok("<LM>Мальчик уронил стакан.").input_ids
    assert ids[0] == tok.convert_tokens_to_ids("<LM>")  # a prefix is one token
    assert 2 not in ids  # no </s> appended, like FRED's GPT2 tokenizer
    assert tok.decode(ids) == "<LM>Мальчик уронил стакан."  # byte-level: lossless round trip
    for t in ["<SC1>", "<SC6>", "<extra_id_0>", "<extra_id_99>"]:
        assert len(tok(t).input_ids) == 1
    # Any text, including characters never seen in training, encodes without <unk> (byte fallback).
    assert 3 not in tok("漢字 ½ ẞ").input_ids
    assert max_input_tokens(tok) == 512


def test_tiny_model_is_t5_v11_with_untied_head():
    model, tok = build_tiny()
    cfg = model.config
    assert cfg.feed_forward_proj == "gated-gelu" and declared_untied(cfg)  # 5.x keeps the flag True (untied.py)
    assert cfg.decoder_start_token_id == 0 and cfg.eos_token_id == 2
    assert cfg.vocab_size == len(tok)
    assert model.lm_head.weight.data_ptr() != model.shared.weight.data_ptr()
    assert not torch.equal(model.lm_head.weight, model.shared.weight)
    big, _ = build_tiny(d_model=128, num_layers=3)
    assert big.config.d_model == 128 and big.config.num_decoder_layers == 3


def test_load_tiny_info():
    loaded = load_model("tiny", device="cpu")
    info = loaded.info
    assert info["model"] == "tiny" and info["source"] == "tiny"
    assert info["dtype"] == "float32" and info["device"] == "cpu"
    assert info["parameters"] == sum(p.numel() for p in loaded.model.parameters())
    assert info["max_input_tokens"] == 512 and info["eos_token_id"] == 2
    assert info["tokenizer_appends_eos"] is False and info["tie_word_embeddings"] is False
    assert info["fingerprint"] == load_model("tiny").info["fingerprint"]
    assert not loaded.model.training


# ----------------------------------------------------------------------------------------------- save / load


def test_untied_head_survives_save_and_load(tmp_path):
    model, tok = build_tiny(seed=7)
    with torch.no_grad():  # make the head unmistakably its own
        model.lm_head.weight.mul_(-0.5).add_(0.25)
    model.save_pretrained(tmp_path, safe_serialization=True)
    tok.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()

    loaded = load_model(str(tmp_path), device="cpu")
    m2 = loaded.model
    assert torch.equal(m2.lm_head.weight, model.lm_head.weight)
    assert not torch.equal(m2.lm_head.weight, m2.shared.weight)
    ids = tok(["<LM>Девочка открыла окно.", "Вопрос: да или нет?"], padding=True, return_tensors="pt")
    dec = torch.tensor([[0, 5, 6, 7], [0, 8, 9, 10]])
    with torch.no_grad():
        a = model(**ids, decoder_input_ids=dec).logits
        b = m2(**ids, decoder_input_ids=dec).logits
    assert torch.equal(a, b)
    assert loaded.info["source"] == "local" and loaded.info["fingerprint"].startswith("dir-")
    assert loaded.tokenizer("<LM>x").input_ids == tok("<LM>x").input_ids


def test_local_dir_dtype_override(tmp_path):
    model, tok = build_tiny()
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded = load_model(tmp_path, dtype="bf16")
    assert loaded.model.shared.weight.dtype == torch.bfloat16 and loaded.info["dtype"] == "bfloat16"


def test_hierarchical_dir_goes_through_load_hierarchical(tmp_path):
    from rsg_eval.models.adapters import AdaptedLMHead
    from rsg_eval.corpus.labels import head_labels
    from rsg_eval.models.hierarchical import HierarchicalT5

    base, tok = build_tiny()
    hier = HierarchicalT5.from_base(base, split=1, **head_labels())
    with torch.no_grad():  # a non-zero LM adapter, so the head differs from the base head
        for p in hier.lm_adapter.parameters():
            p.add_(0.05)
    hier.save_pretrained(tmp_path / "ckpt", tokenizer=tok)
    loaded = load_model(tmp_path / "ckpt")
    assert isinstance(loaded.model.lm_head, AdaptedLMHead)
    assert loaded.info["source"] == "hierarchical"
    assert isinstance(loaded.info["hierarchical"], HierarchicalT5)
    ids = tok(["<LM>Утром пошёл дождь."], return_tensors="pt")
    dec = torch.tensor([[0, 5, 6]])
    with torch.no_grad():
        want = hier.seq2seq(**ids, decoder_input_ids=dec).logits
        got = loaded.model(**ids, decoder_input_ids=dec).logits
    assert torch.allclose(want, got, atol=1e-6)


# ----------------------------------------------------------------------------------------------- errors


def test_missing_path_is_one_clear_error(tmp_path):
    with pytest.raises(RSGError, match="does not exist"):
        load_model(str(tmp_path / "no" / "such" / "model"))
    with pytest.raises(RSGError, match="does not exist"):
        load_model("./not-here")
    f = tmp_path / "weights.bin"
    f.write_bytes(b"x")
    with pytest.raises(RSGError, match="directory"):
        load_model(str(f))


def test_dir_without_model_files_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(RSGError, match="no config.json"):
        load_model(tmp_path / "empty")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(RSGError, match=r"bad/config\.json:1: not valid JSON"):
        load_model(bad)


def test_unreachable_hub_id_is_a_clear_error(monkeypatch):
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)  # fail fast instead of retrying the network
    with pytest.raises(RSGError, match="could not load .* hub id 'nobody-here/no-such-model-xyz'"):
        load_model("nobody-here/no-such-model-xyz")


def test_dtype_rules():
    cpu = torch.device("cpu")
    assert resolve_dtype(None, cpu) == torch.float32
    assert resolve_dtype("auto", cpu) == torch.float32
    assert resolve_dtype("bf16", cpu) == torch.bfloat16
    assert resolve_dtype(torch.float32, cpu) == torch.float32
    with pytest.raises(RSGError, match="fp16 is refused"):
        resolve_dtype("fp16", cpu, model_type="t5")
    with pytest.raises(RSGError, match="fp16 is refused"):
        load_model("tiny", dtype="float16")
    assert resolve_dtype("fp16", cpu, model_type="t5", allow_fp16=True) == torch.float16
    assert resolve_dtype("fp16", cpu, model_type="bart") == torch.float16
    with pytest.raises(RSGError, match="unknown dtype"):
        resolve_dtype("fp8", cpu)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_cuda_without_gpu_is_a_clear_error():
    with pytest.raises(RSGError, match="no GPU"):
        load_model("tiny", device="cuda")


# ----------------------------------------------------------------------------------------------- decoder-only


def test_tiny_causal_is_a_deterministic_llama_with_the_tiny_tokenizer():
    from rsg_eval.models.tiny import build_tiny_causal

    m1, t1 = build_tiny_causal()
    m2, _ = build_tiny_causal()
    assert _weights_hash(m1) == _weights_hash(m2)
    assert _weights_hash(build_tiny_causal(seed=1)[0]) != _weights_hash(m1)
    cfg = m1.config
    assert cfg.model_type == "llama" and not cfg.is_encoder_decoder and not cfg.tie_word_embeddings
    assert cfg.num_key_value_heads < cfg.num_attention_heads  # grouped-query attention, as modern Llamas
    assert t1.backend_tokenizer.to_str() == build_tiny_tokenizer().backend_tokenizer.to_str()
    assert cfg.vocab_size == len(t1) and cfg.max_position_embeddings == 512
    loaded = load_model("tiny-causal", causal_ok=True)
    assert loaded.info["kind"] == "causal" and loaded.info["model"] == "tiny-causal"
    assert loaded.info["fingerprint"].startswith("tiny-causal-") and loaded.info["max_input_tokens"] == 512
    assert load_model("tiny").info["kind"] == "seq2seq"


def _save_causal(kind: str, path):
    from transformers import GPT2Config, GPT2LMHeadModel

    from rsg_eval.models.tiny import build_tiny_causal

    if kind == "llama":
        model, tok = build_tiny_causal(seed=4)
    else:
        tok = build_tiny_tokenizer()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(4)
            model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=4, n_positions=256,
                                               bos_token_id=1, eos_token_id=2, pad_token_id=0)).eval()
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return model, tok


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_local_decoder_only_folder_loads_through_the_hub_path(tmp_path, kind):
    """A Llama- or GPT-2-shaped folder saved with save_pretrained loads by its config (AutoModelForCausalLM) and
    scores exactly as the model it was saved from."""
    from rsg_eval.models.loading import model_kind
    from rsg_eval.scoring import score_choices

    model, tok = _save_causal(kind, tmp_path / kind)
    assert model_kind(tmp_path / kind) == "causal" and model_kind("tiny-causal") == "causal"
    loaded = load_model(tmp_path / kind, causal_ok=True)
    assert type(loaded.model) is type(model) and loaded.info["kind"] == "causal"
    assert loaded.info["source"] == "local" and loaded.info["model_type"] == kind
    assert _weights_hash(loaded.model) == _weights_hash(model)
    prompts, choices = ["Вопрос: верно ли это?", "Мальчик уронил стакан."], [["да", "нет"], ["Он разбился.", "Нет."]]
    assert score_choices(loaded.model, loaded.tokenizer, prompts, choices) == \
        score_choices(model, tok, prompts, choices)
    # The context: the tokenizer's 512, capped by the positions the model has (GPT-2 here: 256).
    assert loaded.info["max_input_tokens"] == (256 if kind == "gpt2" else 512)


def test_decoder_only_models_are_refused_where_seq2seq_is_needed(tmp_path):
    from rsg_eval.models.loading import require_seq2seq

    _save_causal("llama", tmp_path / "m")
    for name in ("tiny-causal", str(tmp_path / "m")):
        with pytest.raises(RSGError, match=r"decoder-only model .*seq2seq models only"):
            load_model(name)  # without causal_ok: fine-tuning, train-hmtl, --nli-head
        with pytest.raises(RSGError, match=f"'{name}' is a decoder-only model; rsg finetune works with seq2seq"):
            require_seq2seq(name, "rsg finetune")
    require_seq2seq("tiny", "rsg finetune")
    require_seq2seq("some-org/unknown-hub-id", "rsg finetune")  # unknown without the network: load_model decides


# ----------------------------------------------------------------------------------------------- placement, bf16


@pytest.mark.parametrize("name", ["tiny", "tiny-causal"])
def test_device_map_auto_loads_and_scores_identically(tmp_path, name):
    """--device-map auto (accelerate's big-model loading): the built-in models and saved folders load with it and
    score exactly as without it. On a CPU-only machine everything lands on the CPU."""
    from rsg_eval.scoring import score_choices

    prompts, choices = ["<LM>Вопрос: верно ли это?"], [["да", "нет", "не знаю"]]
    plain = load_model(name, causal_ok=True)
    want = score_choices(plain.model, plain.tokenizer, prompts, choices)
    spread = load_model(name, causal_ok=True, device_map="auto")
    assert spread.info["device_map"] == {"": "cpu"}
    assert score_choices(spread.model, spread.tokenizer, prompts, choices) == want
    plain.model.save_pretrained(tmp_path / "m")
    plain.tokenizer.save_pretrained(tmp_path / "m")
    from_dir = load_model(tmp_path / "m", causal_ok=True, device_map="auto")
    assert from_dir.info["device_map"] == {"": "cpu"}
    assert score_choices(from_dir.model, from_dir.tokenizer, prompts, choices) == want
    with pytest.raises(RSGError, match="give one"):
        load_model(name, causal_ok=True, device="cpu", device_map="auto")
    with pytest.raises(RSGError, match="unknown device map"):
        load_model(name, causal_ok=True, device_map="everywhere")


def test_auto_bf16_only_where_the_gpu_computes_it_natively(monkeypatch):
    """torch.cuda.is_bf16_supported() is True on V100/T4 through emulation; "auto" must not pick bf16 there."""
    from rsg_eval.models import loading

    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for native in (False, True):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                            lambda including_emulation=True, native=native: native or including_emulation)
        assert loading.cuda_bf16_native() is native
        assert resolve_dtype("auto", cuda) == (torch.bfloat16 if native else torch.float32)

    def old_torch(*args):  # torch < 2.3: no including_emulation argument
        if args:
            raise TypeError("unexpected argument")
        return True

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda **kw: old_torch(*kw.values()))
    for major, native in ((7, False), (8, True)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, major=major: (major, 0))
        assert loading.cuda_bf16_native() is native
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert loading.cuda_bf16_native() is False


def test_every_auto_bf16_decision_goes_through_the_native_check():
    """No call site asks torch.cuda.is_bf16_supported() directly (it says True for emulated bf16)."""
    from pathlib import Path

    import rsg_eval

    root = Path(rsg_eval.__file__).parent
    hits = [str(p.relative_to(root)) for p in root.rglob("*.py")
            if "is_bf16_supported(" in p.read_text(encoding="utf-8")]
    assert hits == ["models/loading.py"]


@pytest.mark.parametrize("typo, meant", [("tinyy", "tiny"), ("Tiny", "tiny"), ("tiny-casual", "tiny-causal")])
def test_a_typo_of_a_builtin_model_says_did_you_mean(typo, meant, monkeypatch):
    import rsg_eval.models.loading as L

    def no_hub(*a, **k):
        raise AssertionError("the hub was asked about a typo")

    monkeypatch.setattr(L, "hub_cache_only", no_hub)
    with pytest.raises(RSGError) as e:
        load_model(typo, device="cpu", causal_ok=True)
    assert f"did you mean {meant}?" in str(e.value)


def test_cpu_thread_choice_follows_the_model_size(tmp_path, monkeypatch):
    """Issue 23 item 6: on a CPU a small model runs on the idle cores (threads on busy cores only wait on each
    other), a large one keeps torch's default; --threads wins, and a user's OMP_NUM_THREADS is left alone."""
    import os

    from rsg_eval.models.threads import SMALL_WEIGHTS_BYTES, choose_cpu_threads, idle_cores, weights_bytes

    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    from rsg_eval.models import threads

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)   # a 2-core machine
    load = [0.3]
    monkeypatch.setattr(threads, "busy_cores", lambda: load[0])   # other work's cores (measured: test below)
    try:
        assert idle_cores() == 2                       # quiet: both cores
        load[0] = 1.4
        assert idle_cores() == 1                       # one core busy with other work
        load[0] = 7.5
        assert idle_cores() == 1                       # never fewer than 1
        torch.set_num_threads(2)
        load[0] = 0.2
        assert choose_cpu_threads("tiny", "cpu", None) == 2 and torch.get_num_threads() == 2
        load[0] = 3.0
        assert choose_cpu_threads("tiny", "cpu", None) == 1 and torch.get_num_threads() == 1
        torch.set_num_threads(2)
        assert choose_cpu_threads("tiny", "cpu", 2) == 2 and torch.get_num_threads() == 2
        big = tmp_path / "big"
        big.mkdir()
        with open(big / "model.safetensors", "wb") as fh:  # sparse: the size is what counts
            fh.truncate(SMALL_WEIGHTS_BYTES + 1)
        assert weights_bytes(str(big)) == SMALL_WEIGHTS_BYTES + 1
        assert choose_cpu_threads(str(big), "cpu", None) is None and torch.get_num_threads() == 2
        small = tmp_path / "small"
        (small / "final").mkdir(parents=True)  # a hierarchical checkpoint keeps its weights a level down
        (small / "final" / "model.safetensors").write_bytes(b"\0" * 1024)
        assert choose_cpu_threads(str(small), "cpu", None) == 1
        torch.set_num_threads(2)
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        assert choose_cpu_threads("tiny", "cpu", None) is None and torch.get_num_threads() == 2
        monkeypatch.delenv("OMP_NUM_THREADS")
        assert choose_cpu_threads("tiny", "cuda", None) is None  # a GPU run leaves the CPU threads alone
        assert weights_bytes("owner/not-cached-anywhere") is None
    finally:
        torch.set_num_threads(before)


def test_busy_cores_sees_other_processes_spinning():
    """The measurement behind the thread choice: processes spinning on every core make the machine about that many
    cores busier (bounded below only: load from elsewhere adds)."""
    import subprocess
    import sys
    import time

    from rsg_eval.models.threads import busy_cores

    if busy_cores() is None:
        pytest.skip("no /proc/stat here")
    code = "import time\nt = time.time() + 5\nwhile time.time() < t: pass"
    spin = [subprocess.Popen([sys.executable, "-c", code]) for _ in range(min(2, os.cpu_count() or 1))]
    try:
        time.sleep(0.3)   # the spinners are running
        busy = busy_cores(0.5)
    finally:
        for p in spin:
            p.kill()
            p.wait()
    assert busy is not None and busy >= len(spin) - 0.5
