"""Your own models (README, "Your own models"): a Llama-architecture teacher from a Hugging Face
folder, a Whisper checkpoint's encoder, a chat format and a byte-level BPE tokenizer, all with
random weights in the real layouts (no network here), through the tiny pipeline; and the errors
a bad folder gets."""
import json
import os

import pytest
import torch

import data
import eval as E
import model as M
import train

FORMAT = {"user": "<|im_start|>user\n", "assistant": "<|im_end|>\n<|im_start|>assistant\n",
          "end": "<|im_end|>"}


def bpe_tokenizer(data_dir):
    """A byte-level BPE trained on the tiny corpus, with the chat format's special tokens (no
    audio placeholder: the pipeline adds it)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    recs = [r for pool in ("text", "train")
            for r in data.read_manifest(os.path.join(data_dir, f"{pool}.jsonl"), audio=False)]
    tok.train_from_iterator(data.toy_corpus(recs), trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tok


def write_llama_folder(folder, tok, layout="bin", seed=0):
    """A random Llama in the Hugging Face layout: config.json (its vocabulary padded 8 rows past the
    tokenizer's, as real checkpoints often are), weights as `layout` ("bin", "sharded" or
    "safetensors"), tokenizer.json. -> the Decoder written."""
    os.makedirs(folder, exist_ok=True)
    torch.manual_seed(seed)
    cfg = M.DecoderConfig(vocab_size=tok.get_vocab_size() + 8, dim=48, n_layers=2, n_heads=4,
                          n_kv_heads=2, hidden_dim=128, tie_embeddings=False, max_seq_len=512)
    dec = M.Decoder(cfg)
    sd = {(k if k == "lm_head.weight" else "model." + k): v.clone()
          for k, v in dec.state_dict().items()}
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(M.llama_config(cfg), f)
    if layout == "bin":
        torch.save(sd, os.path.join(folder, "pytorch_model.bin"))
    elif layout == "sharded":
        keys = sorted(sd)
        shards = {"pytorch_model-00001-of-00002.bin": keys[:len(keys) // 2],
                  "pytorch_model-00002-of-00002.bin": keys[len(keys) // 2:]}
        for name, ks in shards.items():
            torch.save({k: sd[k] for k in ks}, os.path.join(folder, name))
        with open(os.path.join(folder, "pytorch_model.bin.index.json"), "w") as f:
            json.dump({"metadata": {},
                       "weight_map": {k: name for name, ks in shards.items() for k in ks}}, f)
    else:
        from safetensors.torch import save_file
        save_file(sd, os.path.join(folder, "model.safetensors"))
    tok.save(os.path.join(folder, "tokenizer.json"))
    return dec


def write_whisper(path, n_mels=128, seed=1):
    """A random Whisper checkpoint in openai's layout ({"dims", "model_state_dict"}; a decoder
    tensor too, as the real files have), with 128 mel bands as large-v3 takes."""
    torch.manual_seed(seed)
    dims = dict(n_mels=n_mels, n_audio_ctx=1500, n_audio_state=32, n_audio_head=2, n_audio_layer=1,
                n_vocab=51866, n_text_ctx=448, n_text_state=32, n_text_head=2, n_text_layer=1)
    enc = M.AudioEncoder(n_mels, 1500, 32, 2, 1)
    sd = {"encoder." + k: v for k, v in enc.state_dict().items()}
    sd["decoder.token_embedding.weight"] = torch.randn(4, 32)
    torch.save({"dims": dims, "model_state_dict": sd}, path)
    return enc


@pytest.fixture(scope="module")
def own(tmp_path_factory, tiny_data):
    root = tmp_path_factory.mktemp("own")
    tok = bpe_tokenizer(tiny_data)
    teacher = write_llama_folder(str(root / "llama"), tok)
    whisper = write_whisper(str(root / "whisper.pt"))
    with open(root / "chat.json", "w") as f:
        json.dump(FORMAT, f)
    return root, tok, teacher, whisper


def logits(dec, ids):
    dec.eval()
    with torch.no_grad():
        return dec.logits(dec(torch.tensor([ids])))


@pytest.mark.parametrize("layout", ["bin", "sharded", "safetensors"])
def test_a_folder_loads_to_the_logits_of_the_weights_it_was_written_from(tmp_path, own, layout):
    if layout == "safetensors":
        pytest.importorskip("safetensors")
    _, tok, _, _ = own
    dec = write_llama_folder(str(tmp_path / layout), tok, layout, seed=3)
    back, config = M.load_llama_folder(str(tmp_path / layout))
    assert config["vocab_size"] == dec.cfg.vocab_size
    ids = tok.encode("what is three plus four ?").ids
    assert torch.equal(logits(back, ids), logits(dec, ids))


def test_safetensors_without_the_package_is_a_clear_error(tmp_path, own, monkeypatch):
    _, tok, _, _ = own
    write_llama_folder(str(tmp_path), tok)
    os.replace(tmp_path / "pytorch_model.bin", tmp_path / "model.safetensors")
    # import fails as if absent
    monkeypatch.setitem(__import__("sys").modules, "safetensors.torch", None)
    needs = r"model\.safetensors: reading \.safetensors needs the optional package safetensors"
    with pytest.raises(ValueError, match=needs):
        M.load_llama_folder(str(tmp_path))


def test_bad_folders_are_refused_naming_the_file_and_the_field(tmp_path, own, tiny_data):
    _, tok, _, _ = own
    folder = str(tmp_path / "m")
    write_llama_folder(folder, tok)
    config = json.load(open(os.path.join(folder, "config.json")))

    def with_config(**change):
        with open(os.path.join(folder, "config.json"), "w") as f:
            json.dump({**config, **change}, f)

    os.replace(os.path.join(folder, "config.json"), os.path.join(folder, "moved.json"))
    with pytest.raises(ValueError, match=r"m/config\.json: not found"):
        M.load_llama_folder(folder)
    with_config(rope_scaling={"rope_type": "llama3", "factor": 8.0})
    with pytest.raises(ValueError,
                       match=r"config\.json: field 'rope_scaling' = .* is not supported"):
        M.load_llama_folder(folder)
    with_config(attention_bias=True)
    with pytest.raises(ValueError, match=r"config\.json: field 'attention_bias'"):
        M.load_llama_folder(folder)
    with_config(model_type="qwen2")
    with pytest.raises(ValueError, match=r"config\.json: field 'model_type' = 'qwen2'"):
        M.load_llama_folder(folder)
    with_config()
    sd = torch.load(os.path.join(folder, "pytorch_model.bin"), weights_only=True)
    del sd["model.layers.1.mlp.down_proj.weight"]
    torch.save(sd, os.path.join(folder, "pytorch_model.bin"))
    lack = r"pytorch_model\.bin: the weights lack \['layers\.1\.mlp\.down_proj\.weight'\]"
    with pytest.raises(ValueError, match=lack):
        M.load_llama_folder(folder)
    # a tokenizer with more tokens than the config's vocabulary: refused before any stage runs
    with_config(vocab_size=tok.get_vocab_size() - 1)
    cfg = train.parse_args(["--preset", "tiny", "--out", str(tmp_path / "run"), "--data", tiny_data,
                            "--teacher", folder])
    more = r"m/tokenizer\.json: \d+ tokens, more than .*config\.json's field 'vocab_size'"
    with pytest.raises(ValueError, match=more):
        train.load_world(cfg)
    # a chat format whose end-of-turn string is several tokens, and one with an unknown field
    two = r"chat\.json: field 'end' = 'the end' is \d+ tokens, expected one"
    for bad, message in (({**FORMAT, "end": "the end"}, two),
                         ({**FORMAT, "system": "x"}, r"chat\.json: unknown field 'system'")):
        with open(tmp_path / "chat.json", "w") as f:
            json.dump(bad, f)
        with_config()
        cfg = train.parse_args(["--preset", "tiny", "--out", str(tmp_path / "run"),
                                "--data", tiny_data, "--teacher", folder,
                                "--chat_format", str(tmp_path / "chat.json")])
        with pytest.raises(ValueError, match=message):
            train.load_world(cfg)
    with open(tmp_path / "w.pt", "wb") as f:
        torch.save({"model_state_dict": {}}, f)
    with pytest.raises(ValueError, match=r"w\.pt: expected openai-whisper's layout"):
        M.read_whisper(str(tmp_path / "w.pt"))


def test_the_chat_format_wraps_prompts_and_responses_in_the_teachers_tokens(own, tiny_data):
    root, tok, _, _ = own
    world = data.World(tiny_data, os.path.join(root, "llama", "tokenizer.json"),
                       data.read_chat_format(root / "chat.json"))
    # the placeholder was added past the tokenizer's own ids
    assert world.audio_id == tok.get_vocab_size()
    # a question about the voice
    r = next(r for r in world.train if r["instruction"] and r["reference"])
    text, speech = world.prompt(r, "text"), world.prompt(r, "speech")
    user, asst = (tok.encode(FORMAT[k]).ids for k in ("user", "assistant"))
    assert text[:len(user)] == user and text[-len(asst):] == asst
    assert world.tok.decode(text[len(user):-len(asst)]) == r["transcript"] + " " + r["instruction"]
    n_transcript = len(tok.encode(r["transcript"]).ids)
    assert speech == user + [world.audio_id] + text[len(user) + n_transcript:]
    assert speech.count(world.audio_id) == 1 and world.audio_id not in text
    resp = data.encode_response(world.tok, r["reference"], world.fmt)
    assert resp[-1] == world.end_id == tok.token_to_id("<|im_end|>")
    assert world.decode(resp + [5, 6]) == r["reference"]


def test_the_pipeline_runs_on_your_own_teacher_and_whisper_and_a_transcripts_only_manifest(
        tmp_path, own, tiny_data):
    root, tok, teacher_written, whisper_written = own
    out = tmp_path / "run"
    own_flags = ["--teacher", str(root / "llama"), "--whisper", str(root / "whisper.pt"),
                 "--chat_format", str(root / "chat.json")]
    train.main(["--preset", "tiny", "--out", str(out), "--data", tiny_data, *own_flags])
    teacher, _ = M.load_model(out / "teacher" / "model.pt", "cpu")  # imported, not trained
    for k, v in teacher_written.state_dict().items():
        assert torch.equal(teacher.state_dict()[k], v), k
    # Whisper's encoder, frozen; heads trained
    encoder, _ = M.load_model(out / "encoder" / "model.pt", "cpu")
    assert encoder.enc_cfg.n_mels == 128
    for k, v in whisper_written.state_dict().items():
        assert torch.equal(encoder.encoder.state_dict()[k], v), k
    student, _ = M.load_model(out / "align" / "xopd" / "model.pt", "cpu")
    assert student.decoder.cfg == teacher.cfg  # one vocabulary: the placeholder needs no row
    fresh = M.student_from_teacher(teacher, encoder.enc_cfg, M.AdapterConfig(d_in=32, d_out=48))
    for k, v in teacher.state_dict().items():  # the student's decoder starts as the teacher
        assert torch.equal(fresh.decoder.state_dict()[k], v), k
    scores = json.load(open(out / "align" / "xopd" / "eval.json"))
    assert (out / "tables.md").exists() and scores["S"]
    # eval.py alone reads the run's own tokenizer and format
    os.remove(out / "align" / "xopd" / "eval.json")
    E.main(["--out", str(out)])
    assert json.load(open(out / "align" / "xopd" / "eval.json")) == scores

    # X-OPD on a manifest of id, audio and transcript only, from the base student above
    mine = tmp_path / "mine"
    mine.mkdir()
    for pool in ("train", "align", "test"):
        with open(mine / f"{pool}.jsonl", "w") as f:
            for r in data.read_manifest(os.path.join(tiny_data, f"{pool}.jsonl"))[:6]:
                f.write(json.dumps({"id": r["id"], "audio": r["audio"],
                                    "transcript": r["transcript"]}) + "\n")
    out2 = tmp_path / "run2"
    train.main(["--preset", "tiny", "--out", str(out2), "--data", str(mine), *own_flags,
                "--student", str(out / "omni" / "model.pt"), "--encoder_steps", "2"])
    student, _ = M.load_model(out2 / "omni" / "model.pt", "cpu")
    base, _ = M.load_model(out / "omni" / "model.pt", "cpu")
    for k, v in base.state_dict().items():  # imported as it was
        assert torch.equal(student.state_dict()[k], v), k
    log = [json.loads(line) for line in open(out2 / "align" / "xopd" / "log.jsonl")]
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    # X-OPD trained the imported student's decoder and left its audio side as it was imported
    aligned, _ = M.load_model(out2 / "align" / "xopd" / "model.pt", "cpu")
    moved = {k for k, v in base.state_dict().items() if not torch.equal(aligned.state_dict()[k], v)}
    assert moved and all(k.startswith("decoder.") for k in moved)
