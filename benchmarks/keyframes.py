"""Keyframe extraction speed (`dreamshot prepare` stage 3) next to PySceneDetect's shot detection alone.

Renders a 720p toy-world clip (H.264, a keyframe every 2 s, grain at about 6 Mbit/s so it decodes like web footage,
a camera pan and a few blurred frames), detects its shots with the default PySceneDetect settings, then
times, in the same run with repeats interleaved (median):
- `pyscenedetect`: shot detection alone (ContentDetector, OpenCV decoder, its automatic downscale);
- `scoring`: the keyframe scoring pass alone (decode, luma downscale, Laplacian, DIS flow);
- `keyframes`: the whole stage 3 (scoring, choice, full-size decode of the chosen frames, PNG writes).
Speed is in video-seconds per wall-second (× real time).

    python benchmarks/keyframes.py [--seconds 10] [--fps 24] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from dreamshot.prepare import keyframes
from dreamshot.prepare.config import PrepareConfig
from dreamshot.prepare.shots import detect_shots
from dreamshot.prepare.stage import VideoJob
from dreamshot.prepare.toyvideo import render_toy_video
from dreamshot.prepare.video import probe

SIZE = (720, 1280)


def timed(work) -> float:
    start = time.perf_counter()
    work()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="clip length")
    parser.add_argument("--fps", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    cfg = PrepareConfig()
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        shot_frames = 4 * args.fps
        scenes = max(1, round(args.seconds * args.fps / shot_frames / 2))  # toy scenes have about 2 shots
        blur = {f: 2.0 for f in range(5, 10**6, 37)}
        video = render_toy_video(
            folder / "clip.mp4",
            scenes=scenes,
            size=SIZE,
            fps=args.fps,
            shot_frames=shot_frames,
            pan=3.0,
            blur=blur,
            grain=4.0,
            crf=23,
        )
        bitrate = probe(video.path).bitrate_kbps
        frames = video.shots[-1][1]
        duration = frames / args.fps
        job = VideoJob("clip", video.path, folder)
        shots = detect_shots(job, cfg.shots)
        inputs = {"curation": {"fps": args.fps, "frames": frames}, "shots": {"shots": shots}}
        work = {
            "pyscenedetect": lambda: detect_shots(job, cfg.shots),
            "scoring": lambda: keyframes.score_frames(job, cfg.keyframes),
            "keyframes": lambda: keyframes.run(job, inputs, cfg, None),
        }
        times: dict[str, list[float]] = {name: [] for name in work}
        for repeat in range(args.repeats + 1):  # the first round warms up (page cache, imports) and is not counted
            for name, step in work.items():
                seconds = timed(step)
                if repeat:
                    times[name].append(seconds)

    cores = len(os.sched_getaffinity(0))
    print(
        f"clip: {SIZE[1]}x{SIZE[0]} H.264 at {bitrate / 1000:.1f} Mbit/s, {frames} frames at {args.fps} fps "
        f"({duration:.1f} s), {len(video.shots)} shots ({len(shots)} detected)"
    )
    print(f"{cores} CPU cores, load average {os.getloadavg()[0]:.1f} at the end, median of {args.repeats}")
    print(f"{'step':<15}{'wall s':>9}{'x real time':>13}")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:<15}{median:>9.3f}{duration / median:>12.1f}x")
    speed = duration / statistics.median(times["keyframes"])
    ratio = statistics.median(times["keyframes"]) / statistics.median(times["pyscenedetect"])
    verdict = "met" if speed >= 5 else "NOT met"
    print(f"keyframe extraction: {speed:.1f}x real time (goal >= 5x: {verdict}), {ratio:.2f}x PySceneDetect's time")


if __name__ == "__main__":
    main()
