"""Size and browser timings of report.html for a large run, and answer times of the app, in headless Chromium.

    python benchmarks/report.py [--images 1000] [--repeats 3] [--skip-app]

The predictions table is synthesized directly (no model run): N rows with scores drawn uniformly in [0, 1] over
4 classes, each row's decision figure a copy of one of 20 figures rendered from 256 x 256 images of the synthetic
dataset (scikit-image textures and photos, `crane_hf.data.synthetic`) with a smooth blob as the map
(`decision_figure.save_decision_figure`, timed per figure). The report is then built from that table as
`crane-hf predict --report` builds it (`run_report.write_run_report`: thumbnails + page) and opened from disk in
headless Chromium (Debian's chromium and chromium-driver): "rendered" is the time from the request until the page's
script has run (`document.body.dataset.ready`), "load event" the navigation timing's loadEventEnd, "filter" a change
of the verdict filter. The app part starts `crane-hf app` on a tiny random Crane+ folder and times, in the browser, an
uploaded image until its verdict is shown, and a change of the image threshold until the verdict is redrawn.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from crane_hf.reporting.decision_figure import save_decision_figure  # noqa: E402
from crane_hf.reporting.run_report import write_run_report  # noqa: E402
from tests.browser import headless_chromium, start_app  # noqa: E402
from tests.tiny_models import save_tiny_model_folder, write_test_images  # noqa: E402

CLASSES = ("bottle", "cable", "screw", "tile")


def _size(path: str) -> int:
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files)


def build_run(folder: str, images: int) -> tuple[list[dict], float]:
    """The synthesized predictions table and its figures; returns (rows, seconds per rendered figure)."""
    from PIL import Image

    from crane_hf.data import generate_synthetic_dataset

    rng = np.random.default_rng(0)
    os.makedirs(os.path.join(folder, "overlays"))
    source = generate_synthetic_dataset(
        os.path.join(folder, "images"),
        classes=["brick", "coins", "grass", "gravel"],
        image_size=256,
        train_good=0,
        test_good=5,
        test_defective=0,
        seed=0,
    )
    pictures = sorted(
        os.path.join(root, name) for root, _, files in os.walk(source) for name in files if "good" in root
    )[:20]
    templates, started = [], time.perf_counter()
    for index, picture in enumerate(pictures):
        image = np.asarray(Image.open(picture).convert("RGB"))
        yy, xx = np.mgrid[0 : image.shape[0], 0 : image.shape[1]]
        centre = rng.integers(40, 216, 2)
        anomaly_map = (0.3 + 0.6 * np.exp(-((yy - centre[0]) ** 2 + (xx - centre[1]) ** 2) / 800.0)).astype(np.float32)
        path = os.path.join(folder, f"template_{index}.png")
        save_decision_figure(
            path,
            image,
            anomaly_map,
            score=float(anomaly_map.max()),
            image_threshold=0.5,
            pixel_threshold=0.6,
            name=f"{CLASSES[index % 4]}/test/defect/{index:03d}.png",
        )
        templates.append(path)
    per_figure = (time.perf_counter() - started) / len(templates)
    rows = []
    for index in range(images):
        name = f"{CLASSES[index % 4]}/test/defect/{index:05d}.png"
        overlay = os.path.join("overlays", f"{index:05d}_{name.replace('/', '_')}.png")
        shutil.copyfile(templates[index % len(templates)], os.path.join(folder, overlay))
        score = float(rng.random())
        rows.append(
            {
                "path": os.path.join("/data", name),
                "score": score,
                "is_anomalous": score >= 0.5,
                "anomalous_pixel_fraction": float(rng.random() * 0.2),
                "overlay": overlay,
                "class_name": CLASSES[index % 4],
            }
        )
    for path in templates:
        os.remove(path)
    return rows, per_figure


def time_report(report: str, repeats: int) -> dict[str, float]:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    rendered, load, filters = [], [], []
    for _ in range(repeats):
        driver = headless_chromium()
        try:
            started = time.perf_counter()
            driver.get("file://" + report)
            WebDriverWait(driver, 120).until(lambda d: d.execute_script("return document.body.dataset.ready"))
            rendered.append(time.perf_counter() - started)
            load.append(
                driver.execute_script("return performance.getEntriesByType('navigation')[0].loadEventEnd") / 1000.0
            )
            started = time.perf_counter()
            Select(driver.find_element(By.ID, "filter-verdict")).select_by_value("anomalous")
            driver.find_element(By.ID, "shown-count").text  # noqa: B018 (waits for the handler to have run)
            filters.append(time.perf_counter() - started)
        finally:
            driver.quit()
    return {
        "rendered": statistics.median(rendered),
        "load": statistics.median(load),
        "filter": statistics.median(filters),
    }


def time_app(work: str, repeats: int) -> dict[str, float]:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from crane_hf.commands import app as app_command

    model_dir = save_tiny_model_folder(os.path.join(work, "model"), "crane+")
    images = write_test_images(os.path.join(work, "images"), count=repeats, size=(256, 256))
    app = app_command.build(argparse.Namespace(model=model_dir, clip=None, dino=None, device="cpu"))
    port = start_app(app)
    driver = headless_chromium()
    uploads, changes = [], []
    try:
        wait = WebDriverWait(driver, 120)
        driver.get(f"http://127.0.0.1:{port}/")
        wait.until(lambda d: "default thresholds" in d.find_element(By.ID, "model-status").text)
        for index, image in enumerate(images):
            before = driver.find_element(By.ID, "result").text
            started = time.perf_counter()
            driver.find_element(By.CSS_SELECTOR, "#image-input input[type=file]").send_keys(image)
            wait.until(
                lambda d, b=before: (
                    (t := d.find_element(By.ID, "result").text) != b and t.startswith(("ANOMALOUS:", "OK:"))
                )
            )
            uploads.append(time.perf_counter() - started)
            value = f"{0.2 + 0.1 * index:.3f}"
            box = driver.find_element(By.CSS_SELECTOR, "#image-threshold input[type=number]")
            box.clear()
            started = time.perf_counter()
            box.send_keys(value + "\n")
            wait.until(lambda d, v=value: f"image threshold {v}" in d.find_element(By.ID, "result").text)
            changes.append(time.perf_counter() - started)
    finally:
        driver.quit()
        app.close()
    return {"upload": statistics.median(uploads), "threshold": statistics.median(changes)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-app", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        run = os.path.join(work, "run")
        rows, per_figure = build_run(run, args.images)
        started = time.perf_counter()
        report = write_run_report(run, rows, image_threshold=0.5, pixel_threshold=0.6, title="benchmark")
        build = time.perf_counter() - started
        browser = time_report(report, args.repeats)
        table = [
            ("images in the report", f"{args.images}"),
            ("decision figure, rendered and saved (s per image)", f"{per_figure:.3f}"),
            ("report build: thumbnails + page (s)", f"{build:.1f}"),
            ("report.html (MB)", f"{_size(report) / 1e6:.2f}"),
            ("report_files/ thumbnails (MB)", f"{_size(os.path.join(run, 'report_files')) / 1e6:.1f}"),
            (
                "report.html + thumbnails (MB)",
                f"{(_size(report) + _size(os.path.join(run, 'report_files'))) / 1e6:.1f}",
            ),
            ("overlays/ figures, not part of the report (MB)", f"{_size(os.path.join(run, 'overlays')) / 1e6:.1f}"),
            (f"Chromium: request to rendered (s, median of {args.repeats})", f"{browser['rendered']:.2f}"),
            ("Chromium: load event (s)", f"{browser['load']:.2f}"),
            ("Chromium: verdict filter applied (s)", f"{browser['filter']:.3f}"),
        ]
        if not args.skip_app:
            app = time_app(work, args.repeats)
            table += [
                (f"app: upload to verdict shown (s, median of {args.repeats})", f"{app['upload']:.2f}"),
                ("app: image threshold change to verdict redrawn (s)", f"{app['threshold']:.2f}"),
            ]
    width = max(len(name) for name, _ in table)
    print(f"| {'measure':<{width}} | value |\n|{'-' * (width + 2)}|------:|")
    for name, value in table:
        print(f"| {name:<{width}} | {value} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
