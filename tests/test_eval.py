"""Evaluation without a model: loaders on fixtures in each published format (quirks included, each
fixture generated here), unreadable records, scoring against hand-computed numbers, and the results
file (header check, crash tail, resume keys, plan) and report (incomplete runs, mixed protocols)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from streamtc.errors import ConfigError, StreamStateError
from streamtc.eval.benchmarks import detect_benchmark, limit_videos, load_benchmark, protocol_of
from streamtc.eval.benchmarks.egoschema import submission, write_submission
from streamtc.eval.benchmarks.videomme import duration_category
from streamtc.eval.datasets import AnnotationError, parse_timestamp
from streamtc.eval.results import ResultsMismatchError, ResultsWriter, read_results
from streamtc.eval.scoring import retention, score, timing_summary
from helpers import mlvu_published, write_json

OPTIONS = ["a red cup", "a phone", "a blue umbrella", "nothing"]


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
    assert benchmark.name == "ovobench" and benchmark.spec.online and benchmark.spec.default_fps == 1.0
    a, b = benchmark.tasks
    assert (a.video, a.path) == ("COIN/a.mp4", tmp_path / "videos" / "COIN" / "a.mp4")
    assert [(q.qid, q.trigger, q.time) for q in a.questions] == [("3", 0, 7.0), ("1", None, 12.5), ("0", None, 215.0)]
    epm = a.questions[2]
    assert (epm.kind, epm.answer, epm.task, epm.category, epm.options) == ("choice", "C", "EPM", "backward", tuple(OPTIONS))
    ssr = a.questions[0]
    assert (ssr.kind, ssr.answer, ssr.category, ssr.text) == ("yes_no", "Yes", "forward", "open the box")
    assert ssr.options is None and ssr.key == ("COIN/a.mp4", "3", 0)
    # REC's trigger points are sorted by time; CRR's question goes into OVO-Bench's CRR prompt
    assert [(q.qid, q.trigger, q.time, q.answer) for q in b.questions] == [
        ("2", 1, 3.0, 0), ("2", 0, 5.0, 1), ("4", 0, 9.0, "No"), ("4", 1, 11.0, "Yes")]
    assert b.questions[0].kind == "count" and b.questions[2].text == "What is in the box?"
    assert b.path == tmp_path / "videos" / "Ego" / "b.mp4" and not b.path.exists()  # missing: reported at run time
    assert benchmark.questions == 7 and not benchmark.problems
    assert detect_benchmark(annotations) == "ovobench"
    assert [t.video for t in limit_videos(benchmark, 1).tasks] == ["COIN/a.mp4"]


@pytest.mark.parametrize("change, message", [
    ({"task": "XYZ"}, "unknown OVO-Bench task 'XYZ'"),
    ({"gt": 7}, "gt 7 is not an index"),
    ({"realtime": float("nan")}, "realtime time stamp nan is not a finite, non-negative time"),
    ({"realtime": float("inf")}, "not a finite, non-negative time"),
    ({"realtime": -3}, "not a finite, non-negative time"),
    ({"realtime": None}, "cannot read None as a time stamp"),
    ({"question": None, "options": None, "gt": None, "realtime": None, "task": "REC"}, "missing field"),
])
def test_an_unreadable_ovobench_record_is_one_problem_not_a_failed_load(tmp_path: Path, change, message) -> None:
    items = ovo_items()
    items[1] = {key: value for key, value in {**items[1], **change}.items() if value is not None or key == "realtime"}
    if change.get("task") == "REC":
        items[1].pop("realtime")
    benchmark = load_benchmark("ovobench", write_json(tmp_path / "ovo.json", items), tmp_path)
    (problem,) = benchmark.problems
    assert message in problem.message and "ovo.json item 1" in problem.message
    assert problem.key == ("COIN/a.mp4", "1", None)
    assert benchmark.questions == 7  # the six readable questions and the unreadable one
    # the bad time never moves a question to after the video: the record is not a question at all
    assert all(q.qid != "1" for t in benchmark.tasks for q in t.questions)


def test_a_bad_trigger_time_fails_that_trigger_point_only(tmp_path: Path) -> None:
    items = ovo_items()
    items[2]["test_info"][1]["realtime"] = float("nan")
    benchmark = load_benchmark("ovobench", write_json(tmp_path / "ovo.json", items), tmp_path)
    (problem,) = benchmark.problems
    assert "item 2 trigger 1: realtime" in problem.message and problem.qid == "2"


def write_streamingbench_csv(path: Path, rows) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["question_id", "task_type", "question", "time_stamp", "answer", "options", "frames_required",
                         "temporal_clue_type"])
        for qid, task, question, stamp, answer, options in rows:
            writer.writerow([qid, task, question, stamp, answer, repr(options), "", ""])
    return path


def test_streamingbench_csv_and_official_json_load_the_same_questions(tmp_path: Path) -> None:
    rows = [
        ("real_sample_1_2", "Counting", "How many cars now?", "00:01:05", "B", ["A. One.", "B. Two.", "C. Three.", "D. Four."]),
        ("real_sample_1_1", "Object Recognition", "What is on the table?", "00:00:09", "A",
         ["A. A cup.", "B. A map.", "C. A pen.", "D. A key."]),
        ("real_sample_12_1", "Text-Rich Understanding", "What does the sign say?", "0:10:00", "D",
         ["A. Stop.", "B. Go.", "C. Exit.", "D. Open."]),
    ]
    write_streamingbench_csv(tmp_path / "Real_Time_Visual_Understanding.csv", rows)
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

    # StreamingBench's src/data/questions_real.json: one entry per question, the same video repeated
    entries = [{"time": "[0:00:00 - 0:00:10]", "video_categories": "x", "video_path": f"./videos/{v}_real.mp4",
                "questions": [{"task_type": task, "question": question, "time_stamp": stamp, "answer": answer,
                               "options": options, "required_ability": "episodic memory"}]}
               for (qid, task, question, stamp, answer, options), v in zip(rows, ["sample_1", "sample_1", "sample_12"])]
    from_json = load_benchmark("auto", write_json(tmp_path / "questions_real.json", entries), tmp_path / "videos")
    assert from_json.name == "streamingbench"
    first_json = from_json.tasks[0]
    assert first_json.video == "sample_1_real.mp4" and len(first_json.questions) == 2
    assert [(q.qid, q.time, q.answer) for q in first_json.questions] == [("1", 9.0, "A"), ("0", 65.0, "B")]
    assert from_json.tasks[1].path == tmp_path / "videos" / "sample_12_real.mp4"


def test_streamingbench_rows_that_break_its_prompt_are_problems(tmp_path: Path) -> None:
    rows = [("real_sample_1_1", "Counting", "How many?", "00:00:09", "A", ["A. 1", "B. 2", "C. 3"]),
            ("real_sample_1_2", "Counting", "How many?", "nan", "A", ["A. 1", "B. 2", "C. 3", "D. 4"]),
            ("real_sample_1_3", "Counting", "How many?", "00:00:04", "E", ["A. 1", "B. 2", "C. 3", "D. 4"]),
            ("bad_id", "Counting", "How many?", "00:00:04", "A", ["A. 1", "B. 2", "C. 3", "D. 4"]),
            ("real_sample_1_4", "Counting", "How many?", "00:00:04", "B", ["A. 1", "B. 2", "C. 3", "D. 4"])]
    benchmark = load_benchmark("streamingbench", write_streamingbench_csv(tmp_path / "rt.csv", rows), tmp_path)
    messages = [p.message for p in benchmark.problems]
    assert len(messages) == 4 and benchmark.questions == 5
    assert "exactly four options, got 3" in messages[0] and "time_stamp" in messages[1]
    assert "'E' is not an option letter" in messages[2] and "is not '..._sample_<n>_<k>'" in messages[3]


def test_mlvu_dev_as_published_loads_with_its_quirks(tmp_path: Path) -> None:
    folder = mlvu_published(tmp_path / "MLVU" / "data")
    touch(tmp_path / "MLVU" / "video" / "2_needle" / "needle_4.mp4")
    benchmark = load_benchmark("auto", folder, tmp_path / "MLVU" / "video")
    assert benchmark.name == "mlvu" and not benchmark.problems and benchmark.questions == 4
    assert [t.video for t in benchmark.tasks] == ["1_plotQA/movie101_21.mp4", "2_needle/needle_4.mp4",
                                                  "7_topic_reasoning/movie101_89.mp4"]  # generation task skipped
    assert benchmark.tasks[1].path == tmp_path / "MLVU" / "video" / "2_needle" / "needle_4.mp4"
    plot, needle, topic = (t.questions[0] for t in benchmark.tasks)
    official, paper = protocol_of("mlvu", "official"), protocol_of("mlvu", "paper")
    assert [official.expected(q) for q in (plot, needle, topic)] == ["C", "@", "D"]  # last match; none: "@"
    assert [paper.expected(q) for q in (plot, needle, topic)] == ["B", "A", "A"]  # first match; none: "A"
    assert official.prompt(topic).text.startswith("Question: \nOptions:\n(A) \n")  # empty, but a prompt
    assert (plot.task, needle.task, topic.task) == ("plotQA", "needle", "topic_reasoning")


def test_the_papers_mlvu_and_videomme_files_with_repeated_video_ids(tmp_path: Path) -> None:
    mlvu = [{"video_id": "movie1", "video_path": f"/data/MLVU/video/{folder}/movie1.mp4", "duration": 246,
             "conversations": [{"question": "Who?", "choices": ["Tom", "Ann"], "answer": "Ann", "question_type": task}]}
            for folder, task in (("1_plotQA", "plotQA"), ("3_ego", "ego"))]
    touch(tmp_path / "video" / "3_ego" / "movie1.mp4")
    benchmark = load_benchmark("auto", write_json(tmp_path / "mlvu_dev_mc.json", mlvu), tmp_path / "video")
    assert benchmark.name == "mlvu" and not benchmark.problems
    assert [(t.video, t.questions[0].qid, t.questions[0].task) for t in benchmark.tasks] == [
        ("1_plotQA/movie1.mp4", "0/0", "plotQA"), ("3_ego/movie1.mp4", "1/0", "ego")]
    assert benchmark.tasks[1].path == tmp_path / "video" / "3_ego" / "movie1.mp4"

    videomme = [{"video_id": "001", "duration": "short", "video_path": "/data/fFjv93ACGo8.mp4",
                 "conversations": [{"question": f"Q{k}?", "choices": ["A. x.", "B. y.", "C. z.", "D. w."],
                                    "answer": "ABC"[k]}]} for k in range(3)]
    benchmark = load_benchmark("auto", write_json(tmp_path / "new_videomme.json", videomme), tmp_path)
    assert benchmark.name == "videomme" and not benchmark.problems
    (task,) = benchmark.tasks  # three entries, one video streamed once
    assert [(q.qid, q.answer, q.category) for q in task.questions] == [
        ("0/0", "A", "short"), ("1/0", "B", "short"), ("2/0", "C", "short")]


def test_egoschema_subset_full_set_and_the_papers_file(tmp_path: Path) -> None:
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

    rekv = [{"video_id": "uid7", "video_path": "/ego/uid7.mp4", "duration": 180,
             "conversations": [{"question": "What?", "choices": ["x", "y", "z", "w", "v"], "answer": "v"}]}]
    (task,) = load_benchmark("egoschema", write_json(tmp_path / "egoschema_subset.json", rekv), tmp_path).tasks
    assert (task.questions[0].extra["q_uid"], task.questions[0].answer) == ("uid7", "E")


def videomme_rows() -> list[dict]:
    return [
        {"video_id": "001", "duration": "short", "domain": "Knowledge", "sub_category": "Humanity & History",
         "url": "https://www.youtube.com/watch?v=fFjv93ACGo8", "videoID": "fFjv93ACGo8", "question_id": "001-1",
         "task_type": "Counting Problem", "question": "Combien de décorations ? « 3 » — 三",
         "options": ["A. 1.", "B. 2.", "C. 3.", "D. 4."], "answer": "C"},
        {"video_id": "001", "duration": "short", "domain": "Knowledge", "sub_category": "Humanity & History",
         "url": "u", "videoID": "fFjv93ACGo8", "question_id": "001-2", "task_type": "OCR Problems",
         "question": "What?", "options": ["A. x", "B. y", "C. z", "D. w"], "answer": "A"},
    ]


def test_videomme_parquet_rows_and_its_own_json(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    parquet = tmp_path / "videomme" / "test-00000-of-00001.parquet"
    parquet.parent.mkdir()
    pq.write_table(pa.Table.from_pylist(videomme_rows()), parquet)
    with pytest.raises(UnicodeDecodeError):
        parquet.read_text(encoding="utf-8")  # not text: it must be read as parquet
    benchmark = load_benchmark("auto", parquet, tmp_path / "data")
    assert benchmark.name == "videomme" and not benchmark.problems
    (task,) = benchmark.tasks
    assert [(q.qid, q.category, q.task, q.answer) for q in task.questions] == [
        ("001-1", "short", "Counting Problem", "C"), ("001-2", "short", "OCR Problems", "A")]
    assert task.questions[0].text == videomme_rows()[0]["question"]
    assert task.questions[0].extra == {"domain": "Knowledge", "sub_category": "Humanity & History"}

    jsonl = tmp_path / "videomme.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in videomme_rows()) + "\n")
    assert load_benchmark("auto", jsonl, tmp_path / "data").tasks == benchmark.tasks

    own = [{"video_id": "001", "duration_category": "long", "video_category": "Knowledge", "url": "u",
            "questions": [{"question_id": "001-1", "task_type": "OCR Problems", "question": "Q?",
                           "choices": ["A. a", "B. b", "C. c", "D. d"], "answer": "D"},
                          {"question_id": "001-2", "task_type": "OCR Problems", "question": "Q?",
                           "choices": ["A. a", "B. b", "C. c", "D. d"], "answer": "Z"}]}]
    own_benchmark = load_benchmark("videomme", write_json(tmp_path / "videomme_own.json", own), tmp_path)
    assert [(q.qid, q.category, q.answer) for q in own_benchmark.tasks[0].questions] == [("001-1", "long", "D")]
    (problem,) = own_benchmark.problems
    assert "answer 'Z' is not an option letter" in problem.message
    assert [duration_category(x) for x in ("Long", 119, 900, 3600, None)] == [
        "long", "short", "medium", "long", "unknown"]


def test_detection_errors_and_time_stamps(tmp_path: Path) -> None:
    unknown = write_json(tmp_path / "data.json", [{"video_id": "v", "video_path": "v.mp4",
                                                   "conversations": [{"question": "q", "choices": ["a"], "answer": "a"}]}])
    with pytest.raises(AnnotationError, match="cannot tell"):
        load_benchmark("auto", unknown, tmp_path)
    with pytest.raises(ConfigError, match="unknown benchmark"):
        load_benchmark("nope", unknown, tmp_path)
    with pytest.raises(AnnotationError, match="no such annotation"):
        load_benchmark("auto", tmp_path / "absent.json", tmp_path)
    with pytest.raises(ConfigError, match="unknown protocol"):
        protocol_of("mlvu", "lmms")
    assert [parse_timestamp(x) for x in ("00:01:05", "1:05", "7.5", 12, "01:00:00")] == [65, 65, 7.5, 12, 3600]
    for bad in ("soon", float("nan"), float("inf"), -1, "-00:00:05", "nan", True, None):
        with pytest.raises(AnnotationError):
            parse_timestamp(bad)


# -- scoring ----------------------------------------------------------------------------------


def answer(task: str, correct: bool | None, *, kind: str = "choice", error: str | None = None, unparsed=False,
           video: str = "v", qid: str | None = None, category: str | None = None, **extra) -> dict:
    """A hand-made answer record whose reply is right, wrong or empty under every official rule."""
    truth = {"choice": "A", "yes_no": "Yes", "count": 2}[kind]
    reply = {"choice": ("A", "B"), "yes_no": ("Yes", "No"), "count": ("2", "5")}[kind][0 if correct else 1]
    answer.n = getattr(answer, "n", 0) + 1
    return {"type": "answer", "video": video, "qid": qid or str(answer.n), "trigger": None, "task": task,
            "category": category, "kind": kind, "options": OPTIONS if kind == "choice" else None,
            "answer": None if correct is None else truth, "response": None if error else ("" if unparsed else reply),
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
    for protocol in ("official", "paper"):
        result = score("ovobench", protocol, records)
        categories = {row.name: row.accuracy for row in result.tables["category"]}
        assert categories == pytest.approx({"real-time": 37.5, "backward": 75.0, "forward": (200 / 3 + 100 + 25) / 3})
        assert round(result.overall, 2) == 58.80  # (37.5 + 75 + 63.9) / 3
        tasks = {row.name: (row.correct, row.total) for row in result.tables["task"]}
        assert tasks == {"OCR": (3, 4), "STU": (0, 1), "EPM": (1, 2), "ASI": (1, 1), "REC": (2, 3), "SSR": (2, 2),
                         "CRR": (1, 4)}
        assert [row.name for row in result.tables["task"]][:2] == ["OCR", "STU"]  # the benchmark's order
        assert result.extra["task_mean"] == pytest.approx((75 + 0 + 50 + 100 + 200 / 3 + 100 + 25) / 7)
        assert (result.questions, result.errors) == (17, 1)
        assert result.missing_videos == {"gone.mp4": "gone.mp4: no such video file"}


def test_streamingbench_mlvu_videomme_egoschema_scores() -> None:
    streaming = score("streamingbench", "official",
                      [answer("Object Recognition", c) for c in (True, True, False)]
                      + [answer("Counting", True), answer("Text-Rich Understanding", False, unparsed=True)])
    assert streaming.overall == pytest.approx(60.0) and streaming.unparsed == 1
    assert {r.name: r.accuracy for r in streaming.tables["task"]} == pytest.approx(
        {"Object Recognition": 200 / 3, "Counting": 100.0, "Text-Rich Understanding": 0.0})

    records = [answer("plotQA", True), answer("plotQA", False), answer("needle", True), answer("needle", True),
               answer("count", False)]
    mlvu = score("mlvu", "official", records)
    assert mlvu.overall == pytest.approx(50.0) and mlvu.extra["micro"] == pytest.approx(60.0)  # M-Avg (50+100+0)/3
    paper = score("mlvu", "paper", records)
    assert paper.overall == pytest.approx(60.0) and paper.extra["m_avg"] == pytest.approx(50.0)  # pooled

    records = [answer("t", True, category="short"), answer("t", True, category="short"),
               answer("t", True, category="medium"), answer("t", False, category="medium"),
               answer("t", False, category="long", error="unreadable"), answer("t", True, category="long", unparsed=True)]
    videomme = score("videomme", "official", records)
    assert {r.name: r.accuracy for r in videomme.tables["duration"]} == {"short": 100.0, "medium": 50.0, "long": 0.0}
    # the unanswered reply leaves the denominator: 3 of 5, not 3 of 6
    assert videomme.overall == pytest.approx(60.0) and videomme.excluded == 1 and videomme.questions == 5
    assert "task" not in videomme.tables
    paper = score("videomme", "paper", records)  # ReKV reads "" as "A", the right letter here
    assert paper.overall == pytest.approx(400 / 6) and paper.excluded == 0

    ego = [answer("egoschema", True, extra={"q_uid": "u1"}), answer("egoschema", False, extra={"q_uid": "u2"}),
           answer("egoschema", True, extra={"q_uid": "u3"}), answer("egoschema", None, extra={"q_uid": "u4"}),
           answer("egoschema", None, unparsed=True, extra={"q_uid": "u5"})]
    ego[3]["response"] = "C"
    result = score("egoschema-full", "official", ego)
    assert result.overall == pytest.approx(200 / 3) and (result.questions, result.unlabelled) == (3, 2)
    judged = [{**r, "prediction": protocol_of("egoschema", "official").judge(r)[0]} for r in ego]
    assert submission(judged, "official") == {"u1": 0, "u2": 1, "u3": 0, "u4": 2, "u5": -1}
    assert submission(judged, "paper")["u5"] == 0  # ReKV submits "A" for a reply without a letter


def test_submission_files_and_timing_summary(tmp_path: Path) -> None:
    records = [{**answer("egoschema", None, extra={"q_uid": "u9"}), "options": list("vwxyz"), "prediction": "E"}]
    json_path, csv_path = write_submission(records, tmp_path / "run.jsonl", "official")
    assert json_path.name == "run.submission.json" and json.loads(json_path.read_text()) == {"u9": 4}
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


def header(questions: int | None = None, **config) -> dict:
    stc = {"cacher": None, "pruner": {"keep_ratio": 0.25}}
    return {"type": "header", "format": "streamtc-eval/1", "questions": questions,
            "config": {"benchmark": "mlvu", "protocol": "official", "fps": 0.5, "stc": stc, **config},
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
    second keeps 66.7% of the first; a third run is incomplete, a fourth of the other protocol."""
    from typer.testing import CliRunner

    from streamtc.cli import app

    def run_file(name: str, outcomes: dict[str, list[bool]], stc, vit_ms: float, planned: int = 6,
                 protocol: str = "official") -> Path:
        path = tmp_path / f"{name}.jsonl"
        with ResultsWriter(path, header(planned, benchmark="ovobench", fps=1.0, stc=stc, protocol=protocol)) as writer:
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
    assert rows["answered"] == ["6/6", "6/6"] and "INCOMPLETE" not in result.output and "PARTIAL" not in result.output
    assert rows["fast"][1].startswith("7.5") and "(-25.0%)" in result.output  # ViT ms/frame against the first run
    assert "STC: Cacher N=2 r=0.25" in result.output and "52.6 uncompressed, 52.0 with STC" in result.output
    assert "protocol official" in result.output and "reply rule: OVO-Bench's scorer" in result.output

    # an interrupted run: 2 of 6 answered; its numbers are marked partial, never final
    half = run_file("half", {"OCR": [True, True]}, None, 100.0)
    result = CliRunner().invoke(app, ["eval", "report", str(base), str(half)])
    assert result.exit_code == 0, result.output
    assert "INCOMPLETE: 2/6 questions answered" in result.output and "PARTIAL overall 100.0" in result.output
    rows = {line.split("│")[1].strip(): [c.strip() for c in line.split("│")[2:-1]]
            for line in result.output.splitlines() if line.startswith("│")}
    assert rows["task: OCR"] == ["50.0", "100.0* (200.0)"] and rows["answered"] == ["6/6", "2/6"]

    # runs of different protocols are refused unless asked for
    paper = run_file("paper", {"OCR": [True, False], "EPM": [True, True], "REC": [False, False]}, None, 100.0,
                     protocol="paper")
    result = CliRunner().invoke(app, ["eval", "report", str(base), str(paper)])
    assert result.exit_code != 0 and "different protocols" in str(result.exception)
    assert "allow-mixed-protocols" in str(result.exception)
    result = CliRunner().invoke(app, ["eval", "report", str(base), str(paper), "--allow-mixed-protocols"])
    assert result.exit_code == 0 and "(paper)" in result.output

    # a file from before protocols existed is refused with the fix
    old = tmp_path / "old.jsonl"
    lines = base.read_text().splitlines()
    first = json.loads(lines[0])
    first["config"]["protocol"] = "stream/1"
    old.write_text("\n".join([json.dumps(first), *lines[1:]]) + "\n")
    with pytest.raises(ConfigError, match="older streamtc"):
        read_results(old).protocol
