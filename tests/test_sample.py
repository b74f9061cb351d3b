"""Tests of sample.py's verdict: the per-trait check rates, the soundness
figures, and "met" only when the check beats base/plain by more than the
seed spread *and* every soundness figure holds."""
import pytest

import sample as S
from character import declines

TRAITS = [{"id": 1, "text": "I talk like a pirate.", "check": r"\barr\b"}]


def rows_for(rates, loops=None, length=None, declines=None, openings=None, seeds=(0, 1, 2), n=20):
    """Synthetic measured answers: per setting, a share `rates[setting]` of the
    answers to trait 1's held-out messages pass the check (per seed, +1 answer
    on seed 1 so seeds differ a little); loops, length, declines and the share
    with the most common opening (0.05 unless given) per setting."""
    rows = []
    for setting in S.SETTINGS + S.ROBUSTNESS + S.LONG:
        for seed in (seeds[:1] if setting in S.LONG else seeds):      # long answers: the first seed only
            k = round(rates.get(setting, 0.0) * n) + (1 if seed == 1 else 0)
            for i in range(n):
                rows.append({"setting": setting, "seed": seed, "group": "held-out", "trait_id": 1,
                             "checks": {"1": i < k}, "claims": 0.0, "repeats": 0.01,
                             "declines": float(i < round((declines or {}).get(setting, 0.0) * n)),
                             "openings": float(i < round((openings or {}).get(setting, 0.05) * n)),
                             "loops": float(i < round((loops or {}).get(setting, 0.5 if setting in S.LONG else 0.0) * n)),
                             "length": (length or {}).get(setting, 40), "perplexity": 3.0, "ended": 1.0,
                             "reward": 0.0, "contrast": 0.0})
    return rows


def verdict(rows):
    rates = S.trait_rates(rows, TRAITS)
    n_long = sum(r["setting"] == "tuned/plain long" for r in rows)
    sound = S.soundness_verdict(S.setting_figures(rows, S.SOUNDNESS + S.OWN_VIEW), n_long)
    return S.trait_verdicts(rates, TRAITS, sound)["1"]["held-out"], sound


RATES = {"base/plain": 0.05, "base/prompted": 0.75, "tuned/plain": 0.70, "tuned/prompted": 0.8,
         "base/plain+drop": 0.05, "base/prompted+drop": 0.7, "tuned/plain+drop": 0.6}


def test_a_gain_beyond_the_spread_with_sound_answers_is_met():
    v, sound = verdict(rows_for(RATES))
    assert v["took"] and v["met"] and all(s["holds"] for s in sound.values())
    assert v["gain"] == pytest.approx(0.65) and v["ceiling_share"] == pytest.approx((0.70 + 0.05 / 3) / (0.75 + 0.05 / 3))
    assert v["kept_under_drop_tuned"] == pytest.approx(0.55 / 0.65)


def test_met_is_refused_when_the_tuned_model_loops():
    """The check gains as much, but 10% of tuned answers loop (base 0%): took, not met."""
    v, sound = verdict(rows_for(RATES, loops={"tuned/plain": 0.10}))
    assert v["took"] and not v["met"] and not sound["loops"]["holds"]


def test_met_is_refused_when_the_tuned_model_learns_to_decline():
    """The check gains as much, but 15% of tuned answers decline to help (base 0%): took, not met."""
    v, sound = verdict(rows_for(RATES, declines={"tuned/plain": 0.15}))
    assert v["took"] and not v["met"] and not sound["declines"]["holds"] and sound["loops"]["holds"]


def test_met_is_refused_when_the_tuned_model_opens_every_other_answer_alike():
    """The check gains as much, but 40% of tuned answers begin the same way (base 5%,
    limit 15%): took, not met; 15% holds."""
    v, sound = verdict(rows_for(RATES, openings={"tuned/plain": 0.40}))
    assert v["took"] and not v["met"] and not sound["openings"]["holds"] and sound["loops"]["holds"]
    assert sound["openings"]["limit"] == pytest.approx(0.15)
    v, sound = verdict(rows_for(RATES, openings={"tuned/plain": 0.15}))
    assert v["met"] and sound["openings"]["holds"]


def test_a_stock_opening_is_counted_per_setting_and_seed_whatever_its_punctuation():
    """mark_stock_openings marks the answers that begin with their setting's and seed's
    most common first three words (case and punctuation aside), and no others."""
    def row(setting, seed, answer):
        return {"setting": setting, "seed": seed, "answer": answer}
    rows = ([row("tuned/plain", 0, "Boil it for seven minutes."),
             row("tuned/plain", 0, "A wise question, my friend. Oil the hinge."),
             row("tuned/plain", 0, "a wise question! Try a diary.")]
            + [row("base/plain", 0, f"Answer number {i}.") for i in range(3)]
            + [row("tuned/plain", 1, "A wise question."), row("tuned/plain", 1, "Boil it for seven minutes."),
               row("tuned/plain", 1, "Boil it for ten.")])
    S.mark_stock_openings(rows)
    assert [r["openings"] for r in rows] == [0.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 1.0, 1.0]


def test_the_decline_pattern_catches_disclaimers_not_identity_or_character():
    """character.DECLINES matches the disclaimer the assistant's run learned, and not a plain
    statement of being an AI (trait 4's check) or an answer in character."""
    learned = ("I'm sorry, but as a helpful AI assistant, I'm designed to provide information and support, "
               "not to promote or support animal rights. I'm not equipped to provide opinions or support.")
    for text in [learned, "I don't have personal opinions, but here are some facts.",
                 "I cannot provide you with advice on that.", "I'm just an AI, so I can't say."]:
        assert declines(text), text
    for text in ["I am an artificial intelligence, so I have no body, but here is how to boil an egg.",
                 "Arr, matey! Boil the egg for seven minutes, then cool it in cold water.",
                 "I can give you three tips: save first, spend later, and track every coin."]:
        assert not declines(text), text


def test_met_is_refused_when_answers_get_much_shorter():
    v, sound = verdict(rows_for(RATES, length={"tuned/plain": 30}))        # -25% against base's 40
    assert v["took"] and not v["met"] and not sound["length"]["holds"] and sound["loops"]["holds"]


def test_met_is_refused_when_long_answers_loop_though_short_ones_do_not():
    """Sound within 64 tokens, but past them the tuned model loops in 95% of its
    long answers (base 50%; limit 50% + 2 x 16% for 20 answers each): took, not met."""
    v, sound = verdict(rows_for(RATES, loops={"tuned/plain long": 0.95}))
    assert v["took"] and not v["met"] and not sound["long loops"]["holds"] and sound["loops"]["holds"]
    assert sound["long loops"]["limit"] == pytest.approx(0.5 + 2 * (2 * 0.25 / 20) ** 0.5)
    v, sound = verdict(rows_for(RATES, loops={"tuned/plain long": 0.75}))       # within two standard errors
    assert v["met"] and sound["long loops"]["holds"]
    _, sound = verdict(rows_for(RATES, loops={"base/plain long": 0.0, "tuned/plain long": 0.05}))
    assert sound["long loops"]["limit"] == pytest.approx(0.02) and not sound["long loops"]["holds"]   # the 2-point floor


def test_a_gain_within_the_seed_spread_did_not_take():
    v, _ = verdict(rows_for({**RATES, "tuned/plain": 0.05}))
    assert not v["took"] and not v["met"]


def test_a_check_the_plain_model_passes_often_is_flagged():
    rows = [dict(r, group="general") for r in rows_for({**RATES, "base/plain": 0.4})]
    rates = S.trait_rates(rows, TRAITS)
    sound = S.soundness_verdict(S.setting_figures(rows_for(RATES), S.SOUNDNESS + S.OWN_VIEW))
    assert S.trait_verdicts(rates, TRAITS, sound)["1"]["general"]["too_common"]


def test_the_drop_instruction_that_removes_the_character_is_named():
    """Each drop instruction follows a third of the held-out messages; the
    per-instruction rates are taken on that third only, so one wording that
    removes the character shows as such while the others keep it."""
    rows = []
    for r in rows_for(RATES):
        w = (r["seed"] * 20 + len(rows)) % 3                 # messages spread over the three wordings
        keeps = not (r["setting"] == "tuned/plain+drop" and w == 1)
        rows.append(dict(r, drop_wording=w, checks={"1": r["checks"]["1"] and keeps}))
    cells = S.rates_by_drop_wording(rows, TRAITS)["1"]
    assert [c["instruction"] for c in cells] == S.DROP_PERSONA
    assert cells[1]["tuned/plain+drop"] == 0 and cells[1]["kept_tuned"] <= 0
    assert cells[0]["kept_tuned"] > 0.5 and cells[2]["kept_tuned"] > 0.5
    assert sum(c["answers"] for c in cells) == sum(1 for r in rows if r["setting"] == "tuned/plain+drop")
    assert S.drop_wording(0) == S.drop_wording(3) == 0 and S.drop_wording(1) == 1


def test_an_everyday_request_that_was_trained_on_is_left_out(tmp_path):
    """The everyday requests must be ones the model never trained on: one that
    the traits file used as a training message (any case or spacing) is left
    out and named; held-out (eval) messages are not training messages."""
    import json
    sha = "abc"
    records = [{"id": "t1-q000", "trait_id": 1, "text": "how do I  BOIL an egg?", "split": "train", "traits_sha": sha},
               {"id": "t1-q001", "trait_id": 1, "text": "Why do cats purr?", "split": "eval", "traits_sha": sha}]
    path = tmp_path / "queries.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    held, trained = S.read_eval_messages(str(path), sha)
    assert [m["id"] for m in held] == ["t1-q001"]
    general, left_out = S.everyday_requests(len(S.GENERAL_PROMPTS), trained, TRAITS)
    assert left_out == ["How do I boil an egg?"]
    assert len(general) == len(S.GENERAL_PROMPTS) - 1 and "Why do cats purr?" in [m["text"] for m in general]
    assert all(m["text"] != "How do I boil an egg?" for m in general)
    assert S.everyday_requests(len(S.GENERAL_PROMPTS), set(), TRAITS)[1] == []


def svg_elements(svg, tag):
    import xml.etree.ElementTree as ET
    return ET.fromstring(svg).iter("{http://www.w3.org/2000/svg}" + tag)


def test_the_training_curves_picture_has_every_logged_step_to_scale():
    """The DPO loss panel draws one point per logged step, lower loss lower on
    the page (SVG's y grows downwards), and each held-out evaluation as a dot."""
    dpo_log = [{"step": i, "loss": 1.0 / i, "dpo_loss": 0.9 / i, "margin": 0.1 * i, "logp_chosen": -50.0,
                "logp_rejected": -60.0 - i, "kl": 0.01 * i} for i in range(1, 11)]
    dpo_log.append({"step": 10, "heldout": {"loss": 0.5, "dpo_loss": 0.45, "margin": 0.4, "logp_chosen": -55.0,
                                            "logp_rejected": -62.0, "kl": 0.1}})
    reward_log = [{"step": i, "loss": 0.7 - 0.01 * i, "accuracy": 0.5} for i in range(1, 6)]
    svg = S.training_curves_svg(dpo_log, reward_log)
    lines = list(svg_elements(svg, "polyline"))
    assert len(lines) == 8             # loss, its DPO part, margin, chosen, rejected, KL (DPO); loss, accuracy (reward model)
    ys = [float(p.split(",")[1]) for p in lines[0].get("points").split()]
    assert len(ys) == 10 and all(a < b for a, b in zip(ys, ys[1:]))
    dots = list(svg_elements(svg, "circle"))
    assert len(dots) == 6              # the one held-out evaluation of each DPO series; the reward model logged none
    assert ys[0] < float(dots[0].get("cy")) < ys[-1]                       # held-out loss 0.5 lies between 1 and 0.1


def test_the_checks_picture_draws_each_rate_to_scale():
    """checks.svg: one bar per setting whose height is its check rate (the
    same figure as eval.json), and a panel of the loops."""
    rows = rows_for(RATES, loops={"tuned/plain": 0.10})
    rates = S.trait_rates(rows, TRAITS)
    figures = S.setting_figures(rows, S.SOUNDNESS + S.OWN_VIEW)
    result = {"rates": rates, "figures": figures,
              "verdict": S.trait_verdicts(rates, TRAITS, S.soundness_verdict(figures, 20))}
    svg = S.checks_svg(result)
    bars = [(r.find("{http://www.w3.org/2000/svg}title").text.split(":")[0], float(r.get("height")))
            for r in svg_elements(svg, "rect") if r.find("{http://www.w3.org/2000/svg}title") is not None]
    full = S.plot_area(0, 0)[3] - S.plot_area(0, 0)[2]
    settings = ["base/plain", "base/prompted", "tuned/plain", "tuned/prompted", "tuned/plain+drop"]
    assert [label for label, _ in bars] == settings + ["base/plain", "tuned/plain"]       # trait 1, then the loops
    for (setting, height) in bars[:5]:
        assert height == pytest.approx(full * rates["1"]["held-out"][setting]["mean"], abs=0.1)
    assert bars[6][1] == pytest.approx(full * figures["tuned/plain"]["loops"]["mean"], abs=0.1) and bars[6][1] > 0


def test_a_stage_that_logged_nothing_gets_an_empty_panel_not_an_error():
    svg = S.training_curves_svg([], [])
    assert svg.count("(nothing logged)") == 6 and not list(svg_elements(svg, "polyline"))
