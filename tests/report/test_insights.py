"""Key insights: each sentence carries the numbers of the summary it was built from, or is absent."""
from posttrain.report.insights import insights


def sft_summary():
    forgetting = {"plain": {"target_accuracy": 1.0, "mean_drop": 0.657},
                  "l2sp:0.03": {"target_accuracy": 0.998, "mean_drop": -0.023}}
    return {"metrics": {"accuracy": 1.0, "forgetting": forgetting, "best_mitigation": {"variant": "l2sp:0.03"}},
            "baseline": {"accuracy": 0.104}}


def test_sentences_quote_the_summaries_numbers():
    bon = {"metrics": {"accuracy": 0.7, "headline": "best-of-16 with the PRM", "by_n": {},
                       "ordering": {"summary": "At N=64: PRM 0.71, ORM 0.6."}}, "baseline": {"accuracy": 0.45}}
    dpo = {"metrics": {"accuracy": 0.62, "kl": 0.0412}, "baseline": {"accuracy": 0.5}}
    text = insights({"sft": sft_summary(), "best-of-n": bon, "dpo": dpo})
    assert len(text) == 3
    assert "1.00" in text[0] and "0.66" in text[0] and "l2sp:0.03" in text[0] and "-0.02" in text[0]
    assert "0.70" in text[1] and "0.45" in text[1] and "PRM 0.71" in text[1]
    assert "0.50 -> 0.62 (+12 points)" in text[2] and "0.041" in text[2]


def test_a_run_without_the_measurement_gets_the_generic_sentence_or_none():
    plain_sft = {"metrics": {"accuracy": 0.9}, "baseline": {"accuracy": 0.1}}
    assert insights({"sft": plain_sft}) == ["sft: held-out accuracy 0.10 -> 0.90 (+80 points)."]
    assert insights({"lora": {"metrics": {}, "baseline": {}}}) == []


def test_distillation_quotes_every_student_and_the_gaps_each_closed():
    students = {kind: {"accuracy": acc} for kind, acc in
                (("sft", 0.6), ("seq_kd", 0.61), ("soft_kd", 0.7), ("on_policy", 0.9))}
    summary = {"metrics": {"students": students, "teacher": {"accuracy": 1.0}, "student_to_teacher_params": 0.24,
                           "gap_closed": 0.75, "gap_closed_by_student": {"seq_kd": 0.025, "soft_kd": 0.25,
                                                                         "on_policy": 0.75}}, "baseline": {}}
    text, = insights({"distill": summary})
    assert "24% of the teacher's parameters" in text and "on-policy KD 0.90" in text and "soft-target KD 0.70" in text
    assert text.endswith("on-policy KD 75% and soft targets 25% closed.")
    del summary["metrics"]["gap_closed_by_student"], students["on_policy"]  # a run from before on-policy KD
    summary["metrics"]["gap_closed"] = 0.25
    assert insights({"distill": summary})[0].endswith("soft targets 25% closed.")


def test_the_math_shepherd_prm_is_quoted_beside_the_checkers():
    reward = {"metrics": {"orm_pair_accuracy": 0.9, "prm_step_accuracy": 0.95, "prm_step_label_mean": 0.8,
                          "prm_ms_step_accuracy": 0.87, "mc_label_agreement": 0.91}, "baseline": {"accuracy": 0.6}}
    by_prm = {"prm": {"accuracy": 0.8, "best_of_n_equal_budget": {"n": 9, "accuracy": 0.75}},
              "prm-ms": {"accuracy": 0.7, "best_of_n_equal_budget": {"n": 8, "accuracy": 0.72}}}
    tree = {"metrics": {"accuracy": 0.8, "headline": "beam 4 x 4 expansions, PRM-guided", "by_prm": by_prm,
                        "generated_tokens_per_problem": 400.0, "best_of_n_equal_budget": {"n": 9, "accuracy": 0.75}},
            "baseline": {"accuracy": 0.6}, "config": {"prm": "prm"}}
    reward_text, tree_text = insights({"reward": reward, "tree-search": tree})
    assert "PRM step accuracy 0.95" in reward_text and "Math-Shepherd's Monte-Carlo labels" in reward_text
    assert "step accuracy 0.87" in reward_text and "on 0.91 of the steps" in reward_text
    assert tree_text.endswith("Guided by the Math-Shepherd-labelled PRM: 0.70, vs best-of-8 with it 0.72.")
