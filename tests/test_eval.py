"""Evaluation without a model: loaders on fixtures in each published format, answer parsing,
scoring against hand-computed numbers, and the results file (header check, crash tail, resume keys)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from streamtc.errors import ConfigError, StreamStateError
from streamtc.eval.datasets import (
    AnnotationError,
    detect_benchmark,
    limit_videos,
    load_benchmark,
    parse_timestamp,
    videomme_duration,
)
from streamtc.eval.results import ResultsMismatchError, ResultsWriter, read_results
from streamtc.eval.scoring import (
    egoschema_submission,
    parse_count,
    parse_prediction,
    parse_yes_no,
    retention,
    score,
    timing_summary,
    write_egoschema_submission,
)

OPTIONS = ["a red cup", "a phone", "a blue umbrella", "nothing"]


def write_json(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


def touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


# -- loaders ----------------------------------------------------------------------------------


def ovo_items() -> list[dict]:
    return [
        {"id": 0, "task": "EPM", "video": "COIN/a.mp4", "realtime": 215, "question": "Who?", "options": OPTIONS, "gt": 2},
        {"id": 1, "task": "OCR", "video": "COIN/a.mp4", "realtime": 12.5, "question": "What text?",
         "options": OPTIONS[:2], "gt": 0},
        {"id": 2, "task": "REC", "video": "Ego/b.mp4", "activity": "jump",
         "test_info": [{"realtime": 5, "count": 1}, {"realtime": 3, "count": 0}]},
        {"id": 3, "task": "SSR", "video": "COIN/a.mp4", "test_info": [{"realtime": 7, "step": "open the box", "type": 1}]},
        {"id": 4, "task": "CRR", "video": "Ego/b.mp4", "question": "What is in the box?", "answer": "a cat",
         "test_info": [{"realtime": 9, "type": 0}, {"realtime": 11, "type": 1}]},
    ]


def test_ovobench_loader_groups_by_video_with_trigger_points(tmp_path: Path) -> None:
    annotations = write_json(tmp_path / "ovo_bench_new.json", ovo_items())
    touch(tmp_path / "videos" / "COIN" / "a.mp4")
    benchmark = load_benchmark("ovobench", annotations, tmp_path / "videos")
    assert benchmark.name == "ovobench" and benchmark.info.online and benchmark.info.default_fps == 1.0
    a, b = benchmark.tasks
    assert (a.video, a.path) == ("COIN/a.mp4", tmp_path / "videos" / "COIN" / "a.mp4")
    assert [(q.qid, q.trigger, q.time) for q in a.questions] == [("3", 0, 7.0), ("1", None, 12.5), ("0", None, 215.0)]
    epm = a.questions[2]
    assert (epm.kind, epm.answer, epm.task, epm.category, epm.options) == ("choice", "C", "EPM", "backward", tuple(OPTIONS))
    ssr = a.questions[0]
    assert (ssr.kind, ssr.answer, ssr.category) == ("yes_no", "Yes", "forward") and "open the box" in ssr.text
    assert ssr.options is None and ssr.key == ("COIN/a.mp4", "3", 0)
    # REC's trigger points are sorted by time; CRR carries its question into the prompt
    assert [(q.qid, q.trigger, q.time, q.answer) for q in b.questions] == [
        ("2", 1, 3.0, 0), ("2", 0, 5.0, 1), ("4", 0, 9.0, "No"), ("4", 1, 11.0, "Yes")]
    assert b.questions[0].kind == "count" and "How many times did they jump?" in b.questions[0].text
    assert "What is in the box?" in b.questions[2].text
    assert b.path == tmp_path / "videos" / "Ego" / "b.mp4" and not b.path.exists()  # missing: reported at run time
    assert a.last_time == 215.0 and benchmark.questions == 7
    assert detect_benchmark(annotations) == "ovobench"
    assert [t.video for t in limit_videos(benchmark, 1).tasks] == ["COIN/a.mp4"]


def test_ovobench_loader_rejects_unknown_tasks_and_bad_answers(tmp_path: Path) -> None:
    with pytest.raises(AnnotationError, match="unknown OVO-Bench task 'XYZ'"):
        load_benchmark("ovobench", write_json(tmp_path / "x.json", [{**ovo_items()[0], "task": "XYZ"}]), tmp_path)
    with pytest.raises(AnnotationError, match="answer index 7"):
        load_benchmark("ovobench", write_json(tmp_path / "y.json", [{**ovo_items()[0], "gt": 7}]), tmp_path)
    with pytest.raises(AnnotationError, match="missing field"):
        load_benchmark("ovobench", write_json(tmp_path / "z.json", [{"id": 1, "task": "REC", "video": "v.mp4"}]), tmp_path)


def test_streamingbench_csv_and_json_conversion_load_the_same_questions(tmp_path: Path) -> None:
    rows = [
        ("real_sample_1_2", "Counting", "How many cars now?", "00:01:05", "B", ["A. One.", "B. Two.", "C. Three.", "D. Four."]),
        ("real_sample_1_1", "Object Recognition", "What is on the table?", "00:00:09", "A",
         ["A. A cup.", "B. A map.", "C. A pen.", "D. A key."]),
        ("real_sample_12_1", "Text-Rich Understanding", "What does the sign say?", "0:10:00", "D",
         ["A. Stop.", "B. Go.", "C. Exit.", "D. Open."]),
    ]
    with (tmp_path / "Real_Time_Visual_Understanding.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["question_id", "task_type", "question", "time_stamp", "answer", "options", "frames_required",
                         "temporal_clue_type"])
        for qid, task, question, stamp, answer, options in rows:
            writer.writerow([qid, task, question, stamp, answer, repr(options), "", ""])
    touch(tmp_path / "videos" / "sample_1" / "video.mp4")  # the layout of the published zip archives
    touch(tmp_path / "videos" / "sample_12_real.mp4")
    from_csv = load_benchmark("auto", tmp_path / "Real_Time_Visual_Understanding.csv", tmp_path / "videos")
    assert from_csv.name == "streamingbench"
    first, second = from_csv.tasks
    assert first.path == tmp_path / "videos" / "sample_1" / "video.mp4" and second.path.name == "sample_12_real.mp4"
    assert [(q.qid, q.time, q.task, q.answer) for q in first.questions] == [
        ("real_sample_1_1", 9.0, "Object Recognition", "A"), ("real_sample_1_2", 65.0, "Counting", "B")]
    assert first.questions[1].options == ("A. One.", "B. Two.", "C. Three.", "D. Four.")
    assert second.questions[0].time == 600.0

    # the JSON conversion: one entry per (video, time window), the same video repeated
    entries = [{"video_path": f"/data/StreamingBench/videos/{v}_real.mp4", "time": "[...]", "questions": [
        {"task_type": task, "question": question, "time_stamp": stamp, "answer": answer, "options": options}]}
        for (qid, task, question, stamp, answer, options), v in zip(rows, ["sample_1", "sample_1", "sample_12"])]
    from_json = load_benchmark("auto", write_json(tmp_path / "questions_real.json", entries), tmp_path / "videos")
    assert from_json.name == "streamingbench"
    first_json = from_json.tasks[0]
    assert first_json.video == "sample_1_real.mp4" and len(first_json.questions) == 2
    assert [(q.qid, q.time, q.answer) for q in first_json.questions] == [("1", 9.0, "A"), ("0", 65.0, "B")]
    assert from_json.tasks[1].path == tmp_path / "videos" / "sample_12_real.mp4"


def rekv_record(video_id: str, duration, conversations: list[dict]) -> dict:
    return {"video_id": video_id, "video_path": f"{video_id}.mp4", "duration": duration, "conversations": conversations}


def test_mlvu_rekv_format_and_official_task_files(tmp_path: Path) -> None:
    data = [rekv_record("1_plotQA/movie1", 246, [
        {"question": "Who?", "choices": ["Tom", "Ann", "Bob", "Kim"], "answer": "Bob"},
        {"question": "How many?", "choices": ["1", "2", "3", "4"], "answer": "3", "question_type": "count"},
    ])]
    benchmark = load_benchmark("auto", write_json(tmp_path / "mlvu_dev_mc.json", data), tmp_path / "v")
    assert benchmark.name == "mlvu" and not benchmark.info.online and benchmark.info.default_fps == 0.5
    (task,) = benchmark.tasks
    assert [(q.qid, q.task, q.answer, q.time) for q in task.questions] == [
        ("0", "plotQA", "C", None), ("1", "count", "C", None)]  # the task from the MLVU folder, or given

    folder = tmp_path / "MLVU" / "json"
    write_json(folder / "1_plotQA.json", [{"video": "movie1.mp4", "duration": 246, "question": "Who?",
                                           "candidates": ["Tom", "Ann"], "answer": "Ann", "question_type": "plotQA"}])
    write_json(folder / "4_count.json", [{"video": "c.mp4", "duration": 9, "question": "How many?",
                                          "candidates": ["1", "2", "3"], "answer": "1", "question_type": "count"}])
    write_json(folder / "8_sub_scene.json", [{"video": "s.mp4", "question": "Describe.", "answer": "text"}])
    touch(tmp_path / "MLVU" / "video" / "4_count" / "c.mp4")
    benchmark = load_benchmark("auto", folder, tmp_path / "MLVU" / "video")
    assert benchmark.name == "mlvu"
    assert [(t.video, t.questions[0].task, t.questions[0].answer) for t in benchmark.tasks] == [
        ("1_plotQA/movie1.mp4", "plotQA", "B"), ("4_count/c.mp4", "count", "A")]  # generation task skipped
    assert benchmark.tasks[1].path == tmp_path / "MLVU" / "video" / "4_count" / "c.mp4"


def test_egoschema_subset_full_set_and_rekv_format(tmp_path: Path) -> None:
    questions = [{"q_uid": f"uid{i}", "google_drive_id": "x", "question": f"Q{i}?",
                  **{f"option {k}": f"opt {k}" for k in range(5)}} for i in range(3)]
    write_json(tmp_path / "ego" / "questions.json", questions)
    write_json(tmp_path / "ego" / "subset_answers.json", {"uid0": 3, "uid2": 0})
    subset = load_benchmark("auto", tmp_path / "ego" / "questions.json", tmp_path / "videos")
    assert subset.name == "egoschema"
    assert [(t.video, t.questions[0].answer, t.questions[0].extra["q_uid"]) for t in subset.tasks] == [
        ("uid0", "D", "uid0"), ("uid2", "A", "uid2")]
    assert subset.tasks[0].path == tmp_path / "videos" / "uid0"
    full = load_benchmark("egoschema-full", tmp_path / "ego", tmp_path / "videos")
    assert [t.questions[0].answer for t in full.tasks] == ["D", None, "A"]
    assert len(full.tasks[0].questions[0].options) == 5

    rekv = [rekv_record("uid7", 180, [{"question": "What?", "choices": ["x", "y", "z", "w", "v"], "answer": 4}])]
    (task,) = load_benchmark("egoschema", write_json(tmp_path / "egoschema_subset.json", rekv), tmp_path).tasks
    assert (task.questions[0].qid, task.questions[0].answer) == ("uid7", "E")


def test_videomme_official_rows_and_rekv_format(tmp_path: Path) -> None:
    rows = [
        {"video_id": "001", "duration": "short", "domain": "Knowledge", "sub_category": "Humanity & History",
         "videoID": "fFjv93ACGo8", "question_id": "001-1", "task_type": "Counting Problem",
         "question": "How many?", "options": ["A. 1.", "B. 2.", "C. 3.", "D. 4."], "answer": "C"},
        {"video_id": "001", "duration": "short", "videoID": "fFjv93ACGo8", "question_id": "001-2",
         "task_type": "OCR Problems", "question": "What?", "options": ["A. x", "B. y", "C. z", "D. w"], "answer": "A"},
    ]
    jsonl = tmp_path / "videomme.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    benchmark = load_benchmark("auto", jsonl, tmp_path / "data")
    assert benchmark.name == "videomme"
    (task,) = benchmark.tasks
    assert [(q.qid, q.category, q.task, q.answer) for q in task.questions] == [
        ("001-1", "short", "Counting Problem", "C"), ("001-2", "short", "OCR Problems", "A")]
    assert task.questions[0].extra == {"domain": "Knowledge", "sub_category": "Humanity & History"}

    data = [rekv_record("v1", 95.0, [{"question": "Q?", "choices": ["a", "b", "c", "d"], "answer": "B"}]),
            rekv_record("v2", 600, [{"question": "Q?", "choices": ["a", "b", "c", "d"], "answer": "d"}]),
            rekv_record("v3", "00:45:00", [{"question": "Q?", "choices": ["a", "b", "c", "d"], "answer": "(A)"}])]
    benchmark = load_benchmark("auto", write_json(tmp_path / "videomme_rekv.json", data), tmp_path)
    assert [(t.questions[0].category, t.questions[0].answer) for t in benchmark.tasks] == [
        ("short", "B"), ("medium", "D"), ("long", "A")]
    assert [videomme_duration(x) for x in ("Long", 119, 900, 3600, None)] == ["long", "short", "medium", "long", None]


def test_detection_errors_and_time_stamps(tmp_path: Path) -> None:
    unknown = write_json(tmp_path / "data.json", [rekv_record("v", 1, [{"question": "q", "choices": ["a"], "answer": "a"}])])
    with pytest.raises(AnnotationError, match="cannot tell"):
        load_benchmark("auto", unknown, tmp_path)
    with pytest.raises(ConfigError, match="unknown benchmark"):
        load_benchmark("nope", unknown, tmp_path)
    with pytest.raises(AnnotationError, match="no such annotation"):
        load_benchmark("auto", tmp_path / "absent.json", tmp_path)
    assert [parse_timestamp(x) for x in ("00:01:05", "1:05", "7.5", 12, "01:00:00")] == [65, 65, 7.5, 12, 3600]
    with pytest.raises(AnnotationError):
        parse_timestamp("soon")


# -- parsing ----------------------------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    ("B", "B"), ("(B)", "B"), ("B.", "B"), ("The answer is B", "B"), ("The answer is B.", "B"), ("b", "B"),
    ("**C**", "C"), ("C. a blue umbrella", "C"), ("Option D", "D"), ("I think (A) fits best", "A"),
    ("answer: (c)", "C"), ("a phone", "B"), ("E", None), ("", None), ("the answer is a cup", None),
    ("I cannot tell.", None),
])
def test_option_letters_are_parsed(text: str, expected: str | None) -> None:
    assert parse_prediction("choice", text, OPTIONS) == expected


@pytest.mark.parametrize("text, expected", [
    ("Yes", "Yes"), ("yes.", "Yes"), ("Y", "Yes"), ("N", "No"), ("No", "No"), ("“No”", "No"),
    ("Yes, he is cutting.", "Yes"), ("No, not yet", "No"), ("I think so, yes", "Yes"), ("maybe yes, maybe no", None),
    ("", None), ("Nothing", None),
])
def test_yes_no_answers_are_parsed(text: str, expected: str | None) -> None:
    assert parse_yes_no(text) == expected and parse_prediction("yes_no", text) == expected


@pytest.mark.parametrize("text, expected", [
    ("3", 3), ("There are 3 people", 3), ("three", 3), ("Zero.", 0), ("1 or 2", 1), ("none", None), ("", None),
])
def test_counts_are_parsed(text: str, expected: int | None) -> None:
    assert parse_count(text) == expected and parse_prediction("count", text) == expected


# -- scoring ----------------------------------------------------------------------------------


def answer(task: str, correct: bool | None, *, kind: str = "choice", category: str | None = None, video: str = "v",
           qid: str | None = None, error: str | None = None, unparsed: bool = False, **extra) -> dict:
    """A hand-made answer record with a known outcome."""
    truth = {"choice": "A", "yes_no": "Yes", "count": 2}[kind]
    wrong = {"choice": "B", "yes_no": "No", "count": 5}[kind]
    prediction = None if (unparsed or error) else (truth if correct else wrong)
    answer.n = getattr(answer, "n", 0) + 1
    return {"type": "answer", "video": video, "qid": qid or str(answer.n), "trigger": None, "task": task,
            "category": category, "kind": kind, "answer": None if correct is None else truth, "prediction": prediction,
            "error": error, **extra}


def test_ovobench_score_is_the_mean_of_the_three_category_means() -> None:
    records = (
        [answer("EPM", True), answer("EPM", False), answer("ASI", True)]  # backward: 50, 100 -> 75
        + [answer("OCR", c) for c in (True, True, True, False)]  # real-time: OCR 75,
        + [answer("STU", False, error="gone.mp4: no such video file", video="gone.mp4")]  # STU 0 -> 37.5
        + [answer("REC", c, kind="count") for c in (True, True, False)]  # forward, per trigger: REC 66.7,
        + [answer("SSR", True, kind="yes_no") for _ in range(2)]  # SSR 100,
        + [answer("CRR", c, kind="yes_no") for c in (True, False, False, False)]  # CRR 25 -> 63.9
    )
    result = score("ovobench", records)
    categories = {row.name: row.accuracy for row in result.tables["category"]}
    assert categories == pytest.approx({"real-time": 37.5, "backward": 75.0, "forward": (200 / 3 + 100 + 25) / 3})
    assert result.overall == pytest.approx((37.5 + 75.0 + (200 / 3 + 100 + 25) / 3) / 3)  # 58.796
    assert round(result.overall, 2) == 58.80
    tasks = {row.name: (row.correct, row.total) for row in result.tables["task"]}
    assert tasks == {"OCR": (3, 4), "STU": (0, 1), "EPM": (1, 2), "ASI": (1, 1), "REC": (2, 3), "SSR": (2, 2),
                     "CRR": (1, 4)}
    assert [row.name for row in result.tables["task"]][:2] == ["OCR", "STU"]  # the benchmark's order
    assert result.extra["task_mean"] == pytest.approx((75 + 0 + 50 + 100 + 200 / 3 + 100 + 25) / 7)
    assert (result.questions, result.errors, result.missing_videos) == (17, 1, {"gone.mp4": "gone.mp4: no such video file"})


def test_streamingbench_mlvu_videomme_egoschema_scores() -> None:
    streaming = score("streamingbench", [answer("Object Recognition", c) for c in (True, True, False)]
                      + [answer("Counting", True), answer("Text-Rich Understanding", False, unparsed=True)])
    assert streaming.overall == pytest.approx(60.0) and streaming.unparsed == 1
    assert {r.name: r.accuracy for r in streaming.tables["task"]} == pytest.approx(
        {"Object Recognition": 200 / 3, "Counting": 100.0, "Text-Rich Understanding": 0.0})

    mlvu = score("mlvu", [answer("plotQA", True), answer("plotQA", False), answer("needle", True),
                          answer("needle", True), answer("count", False)])
    assert mlvu.overall == pytest.approx(50.0)  # M-Avg = (50 + 100 + 0) / 3
    assert mlvu.extra["micro"] == pytest.approx(60.0)

    videomme = score("videomme", [answer("t", True, category="short"), answer("t", True, category="short"),
                                  answer("t", True, category="medium"), answer("t", False, category="medium"),
                                  answer("t", False, category="long", error="unreadable")])
    assert {r.name: r.accuracy for r in videomme.tables["duration"]} == {"short": 100.0, "medium": 50.0, "long": 0.0}
    assert videomme.overall == pytest.approx(60.0) and "task" not in videomme.tables

    ego = [answer("egoschema", True, extra={"q_uid": "u1"}), answer("egoschema", False, extra={"q_uid": "u2"}),
           answer("egoschema", True, extra={"q_uid": "u3"}), answer("egoschema", None, extra={"q_uid": "u4"}),
           answer("egoschema", None, unparsed=True, extra={"q_uid": "u5"})]
    ego[3]["prediction"] = "C"
    result = score("egoschema-full", ego)
    assert result.overall == pytest.approx(200 / 3) and (result.questions, result.unlabelled) == (3, 2)
    assert egoschema_submission(ego) == {"u1": 0, "u2": 1, "u3": 0, "u4": 2, "u5": -1}


def test_submission_files_and_timing_summary(tmp_path: Path) -> None:
    records = [answer("egoschema", None, extra={"q_uid": "u9"})]
    records[0]["prediction"] = "E"
    json_path, csv_path = write_egoschema_submission(records, tmp_path / "run.submission")
    assert json.loads(json_path.read_text()) == {"u9": 4}
    assert csv_path.read_text().splitlines() == ["q_uid,answer", "u9,4"]

    answers = [{"ttft_ms": 10.0, "total_ms": 30.0}, {"ttft_ms": 20.0, "total_ms": 50.0},
               {"error": "missing", "ttft_ms": None}]
    videos = [{"frames": 4, "vit_ms": 40.0, "prune_ms": 4.0, "prefill_ms": 20.0, "visual_tokens": 40,
               "visual_tokens_encoded": 100, "peak_memory_bytes": 5, "wall_s": 1.0},
              {"frames": 6, "vit_ms": 60.0, "prune_ms": 6.0, "prefill_ms": 80.0, "visual_tokens": 60,
               "visual_tokens_encoded": 100, "peak_memory_bytes": 7, "wall_s": 2.0},
              {"frames": 0, "error": "missing"}]
    timing = timing_summary(answers, videos)
    assert timing["frames"] == 10 and timing["videos"] == 2
    assert timing["vit_ms_per_frame"] == pytest.approx(10.0) and timing["prefill_ms_per_frame"] == pytest.approx(10.0)
    assert timing["ttft_ms_mean"] == pytest.approx(15.0) and timing["answer_ms_mean"] == pytest.approx(40.0)
    assert timing["tokens_kept"] == pytest.approx(0.5) and timing["peak_memory_bytes"] == 7
    assert retention(52.0, 52.6) == pytest.approx(98.859, abs=1e-3) and retention(1.0, None) is None


# -- results files ----------------------------------------------------------------------------


def header(**config) -> dict:
    stc = {"cacher": None, "pruner": {"keep_ratio": 0.25}}
    return {"type": "header", "format": "streamtc-eval/1", "config": {"benchmark": "mlvu", "fps": 0.5, "stc": stc, **config},
            "versions": {"torch": "1"}}


def test_results_file_resume_keys_crash_tail_and_mismatch(tmp_path: Path) -> None:
    path = tmp_path / "run.jsonl"
    with ResultsWriter(path, header()) as writer:
        assert writer.existing is None
        writer.write(answer("plotQA", True, video="v1", qid="q1"))
        writer.write(answer("plotQA", False, video="v2", qid="q1", error="v2.mp4: no such video file"))
        with pytest.raises(StreamStateError, match="another run"):
            ResultsWriter(path, header())  # one writer at a time
    with path.open("a") as handle:
        handle.write('{"type": "answer", "video": "v3", "qi')  # a crash in the middle of a write
    results = read_results(path)
    assert results.truncated_tail and set(results.answers) == {("v1", "q1", None), ("v2", "q1", None)}
    assert results.done_keys() == {("v1", "q1", None), ("v2", "q1", None)}
    assert results.done_keys(retry_errors=True) == {("v1", "q1", None)}

    with pytest.raises(ResultsMismatchError, match="fps"):
        ResultsWriter(path, header(fps=1.0))
    with pytest.raises(ResultsMismatchError, match=r"\(stc\.pruner\.keep_ratio\)"):
        ResultsWriter(path, header(stc={"cacher": None, "pruner": {"keep_ratio": 0.3}}))
    assert read_results(path).truncated_tail  # a refused run leaves the file as it was

    with ResultsWriter(path, header()) as writer:  # resuming: the partial line is cut off first
        assert set(writer.existing.answers) == {("v1", "q1", None), ("v2", "q1", None)}
        writer.write(answer("plotQA", True, video="v2", qid="q1"))  # a retried error: the last line wins
    results = read_results(path)
    assert not results.truncated_tail and results.superseded == 1
    assert results.answers[("v2", "q1", None)]["error"] is None
    assert all(json.loads(line) for line in path.read_text().splitlines())


def test_corrupt_or_foreign_files_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "run.jsonl"
    path.write_text(json.dumps(header()) + "\n{broken\n" + json.dumps(answer("t", True)) + "\n")
    with pytest.raises(StreamStateError, match="line 2"):
        read_results(path)
    other = tmp_path / "other.jsonl"
    other.write_text('{"hello": 1}\n')
    with pytest.raises(ConfigError, match="not a streamtc results file"):
        ResultsWriter(other, header())


def test_report_compares_runs_side_by_side(tmp_path: Path) -> None:
    """Two hand-made OVO-Bench runs: overall (50 + 100 + 0) / 3 = 50.0 and (50 + 50 + 0) / 3 = 33.3, so the
    second keeps 66.7% of the first."""
    from typer.testing import CliRunner

    from streamtc.cli import app

    def run_file(name: str, outcomes: dict[str, list[bool]], stc, vit_ms: float) -> Path:
        path = tmp_path / f"{name}.jsonl"
        with ResultsWriter(path, header(benchmark="ovobench", fps=1.0, stc=stc)) as writer:
            for task, results in outcomes.items():
                for n, correct in enumerate(results):
                    writer.write({**answer(task, correct, qid=f"{task}{n}"), "ttft_ms": 5.0, "total_ms": 9.0})
            writer.write({"type": "video", "video": "v", "frames": 10, "vit_ms": vit_ms, "prefill_ms": 50.0,
                          "prune_ms": 0.0, "visual_tokens": 1960, "visual_tokens_encoded": 1960, "wall_s": 1.0})
        return path

    # categories: real-time (OCR), backward (EPM), forward (REC) -> overall = mean of the three
    base = run_file("base", {"OCR": [True, False], "EPM": [True, True], "REC": [False, False]}, None, 100.0)
    fast = run_file("fast", {"OCR": [True, False], "EPM": [True, False], "REC": [False, False]},
                    {"cacher": {"cache_interval": 2, "update_ratio": 0.25}, "pruner": None}, 75.0)
    result = CliRunner().invoke(app, ["eval", "report", str(base), str(fast)])
    assert result.exit_code == 0, result.output
    rows = {line.split("│")[1].strip(): [c.strip() for c in line.split("│")[2:-1]]
            for line in result.output.splitlines() if line.startswith("│")}
    assert rows["overall"] == ["50.0", "33.3 (66.7)"]
    assert rows["category: backward"] == ["100.0", "50.0 (50.0)"]
    assert rows["task: OCR"] == ["50.0", "50.0 (100.0)"]
    assert rows["fast"][1].startswith("7.5") and "(-25.0%)" in result.output  # ViT ms/frame against the first run
    assert "STC: Cacher N=2 r=0.25" in result.output and "52.6 uncompressed, 52.0 with STC" in result.output
