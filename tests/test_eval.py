"""eval.py: the paper's drop metrics, and the scores evaluate_model assembles from predictions."""
import pytest

import data
import eval as E
import model as M


def test_relative_and_average_drop():
    # ΔS: teacher scores 80 / 50; student 60 / 50 -> drops 25 % and 0 % -> 12.5
    assert E.avg_drop({"arith": 60.0, "facts": 50.0}, {"arith": 80.0, "facts": 50.0}) == pytest.approx(12.5)
    assert E.relative_drop(40.0, 50.0) == pytest.approx(20.0)
    assert E.avg_drop({"arith": 60.0}, {"arith": 80.0, "facts": 50.0}) == pytest.approx(25.0)  # shared families only


def test_evaluate_model_scores_known_predictions(tiny_data, monkeypatch):
    """Predictions chosen here (right from text, every other one wrong from speech, transcripts
    short of their last word): the scores must be the ones computed by hand from them."""
    world = data.World(tiny_data)
    enc, adp, dec = M.make_configs("tiny", world.tok.get_vocab_size())
    student = M.SpeechLM(enc, adp, dec, audio_token_id=world.audio_id)

    def generate(model, world, recs, modality, device, max_new_tokens):
        if modality == "text":
            return [r["teacher"] or r["answer"] for r in recs]
        return [r["transcript"].rsplit(" ", 1)[0] if r["task"] == "asr" else r["answer"] if i % 2 == 0 else "no"
                for i, r in enumerate(recs)]
    monkeypatch.setattr(E, "generate", generate)
    res = E.evaluate_model(student, world, "cpu", per_family=4, max_new_tokens=8)
    text, audio = E.test_sets(world, 4)
    assert res["T"] == {fam: 100.0 for fam in text}
    assert res["S"] == {fam: pytest.approx(100.0 * len(recs[::2]) / len(recs)) for fam, recs in text.items()}
    assert res["audio"] == {t: pytest.approx(100.0 * len(recs[::2]) / len(recs)) for t, recs in audio.items() if t != "asr"}
    asr = audio["asr"]
    assert res["asr_wer"] == pytest.approx(100.0 * sum(1 / len(r["transcript"].split()) for r in asr) / len(asr))
