"""Decision figures, report.html of predict and evaluate (also opened in headless Chromium), F1-max points."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from crane_hf.commands.cli import main
from crane_hf.reporting.charts import f1_max_point, roc_pr_curves, svg_data_uri
from crane_hf.reporting.decision_figure import decision_figure, figure_to_image
from crane_hf.reporting.run_report import image_class

from .browser import require_chromium
from .tiny_models import write_test_images


def keep_screenshot(driver, tmp_path, name: str) -> str:
    """Save a screenshot under the test's tmp folder (and into $CRANE_HF_SCREENSHOTS when set); returns its path."""
    path = str(tmp_path / name)
    assert driver.save_screenshot(path)
    if os.environ.get("CRANE_HF_SCREENSHOTS"):
        os.makedirs(os.environ["CRANE_HF_SCREENSHOTS"], exist_ok=True)
        shutil.copyfile(path, os.path.join(os.environ["CRANE_HF_SCREENSHOTS"], name))
    return path


def _square_map(size=(60, 80), low=0.2, high=0.9):
    anomaly_map = np.full(size, low, dtype=np.float32)
    anomaly_map[20:40, 30:60] = high
    return anomaly_map


def test_decision_figure_writes_name_verdict_score_and_thresholds():
    image = np.full((60, 80, 3), 128, np.uint8)
    figure = decision_figure(
        image, _square_map(), score=0.71, image_threshold=0.5, pixel_threshold=0.55, name="coins/test/hole/000.jpg"
    )
    title = figure.get_suptitle()
    assert "coins/test/hole/000.jpg" in title and "ANOMALOUS" in title and "0.710" in title and "0.500" in title
    _, map_axes, decision_axes, bar_axes = figure.axes  # image, map, decision, colour bar
    assert map_axes.images[0].get_clim() == (0.0, 1.0)  # absolute scale by default
    assert "0.550" in bar_axes.get_ylabel() and "0.550" in decision_axes.get_title()
    assert "12.5%" in decision_axes.get_title()  # 20 x 30 of the 60 x 80 pixels are >= the pixel threshold
    ok = decision_figure(image, _square_map(), score=0.3, image_threshold=0.5, pixel_threshold=0.55, name="a.png")
    assert "OK" in ok.get_suptitle() and "ANOMALOUS" not in ok.get_suptitle()
    stretched = decision_figure(
        image, _square_map(), score=0.3, image_threshold=0.5, pixel_threshold=0.55, name="a", color_scale="image"
    )
    assert stretched.axes[1].images[0].get_clim() == pytest.approx((0.2, 0.9))
    assert "stretched to 0.200-0.900" in stretched.axes[1].get_title()


def test_decision_panel_tints_exactly_the_pixels_above_the_threshold():
    image = np.full((60, 80, 3), 128, np.uint8)
    figure = decision_figure(image, _square_map(), score=0.7, image_threshold=0.5, pixel_threshold=0.55, name="x")
    rendered = np.asarray(figure_to_image(figure)).astype(int)
    decision_axes = figure.axes[2]
    height = rendered.shape[0]

    def pixel(x: float, y: float) -> np.ndarray:  # data coordinates of the panel -> rendered RGB
        column, row = decision_axes.transData.transform((x, y))
        return rendered[round(height - row), round(column)]

    inside, outside = pixel(45, 30), pixel(10, 50)
    assert inside[0] - inside[1] > 60  # tinted red
    assert abs(int(outside[0]) - int(outside[1])) < 8 and abs(int(outside[1]) - int(outside[2])) < 8  # plain grey


def test_decision_figure_refuses_what_it_cannot_draw_honestly():
    image = np.zeros((60, 80, 3), np.uint8)
    bad_map = _square_map()
    bad_map[0, 0] = np.nan
    kwargs = {"score": 0.5, "image_threshold": 0.5, "pixel_threshold": 0.5, "name": "part.png"}
    with pytest.raises(ValueError, match="NaN"):
        decision_figure(image, bad_map, **kwargs)
    with pytest.raises(ValueError, match="80x60 but the map is 60x80"):
        decision_figure(image, _square_map((80, 60)), **kwargs)
    with pytest.raises(ValueError, match="pixel_threshold"):
        decision_figure(image, _square_map(), **{**kwargs, "pixel_threshold": 1.5})
    with pytest.raises(ValueError, match="color_scale"):
        decision_figure(image, _square_map(), **kwargs, color_scale="log")


def test_the_pixel_fraction_compares_exactly_as_predict_does():
    """A threshold just above a float32 score: NumPy would round it to that score and count the pixel as above."""
    from crane_hf.models.crane.thresholds import at_or_above

    value = np.float32(0.3)
    threshold = float(value) + 1e-12
    assert np.float32(threshold) == value  # rounded to float32, the threshold would equal the score
    anomaly_map = np.full((10, 10), value, dtype=np.float32)
    anomaly_map[:5] = 0.9
    figure = decision_figure(
        np.zeros((10, 10, 3), np.uint8),
        anomaly_map,
        score=0.5,
        image_threshold=0.5,
        pixel_threshold=threshold,
        name="x",
    )
    assert float(at_or_above(anomaly_map, threshold).mean()) == 0.5
    assert figure.axes[2].get_title().endswith(": 50.0%")


def test_names_keep_class_and_extension(predict_report):
    rows = json.loads((predict_report / "predictions.json").read_text())["predictions"]
    for row in rows:  # the image's class, split, defect folders and its file name with extension, then ".png"
        expected = "_".join(os.path.normpath(row["path"]).split(os.sep)[-4:]) + ".png"
        assert os.path.basename(row["overlay"]).endswith(expected), (row["overlay"], expected)
    assert {os.path.normpath(row["path"]).split(os.sep)[-4] for row in rows} == {"coins", "moon"}
    assert image_class("/data/mvtec/bottle/test/broken_large/000.png") == "bottle"
    assert image_class("screws/train/good/1.bmp") == "screws"
    assert image_class("/line-3/camera-a/0001.jpg") == "camera-a"


def test_f1_max_point_equals_brute_force():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 200)
    scores = np.round(rng.random(200) * 0.5 + 0.3 * labels, 2)  # ties included
    point = f1_max_point(labels, scores)
    best = max(
        (2 * ((scores >= t) & (labels == 1)).sum() / ((scores >= t).sum() + (labels == 1).sum()), t)
        for t in np.unique(scores)
    )
    assert point.f1 == pytest.approx(best[0]) and point.threshold == pytest.approx(best[1])
    flagged = scores >= point.threshold
    assert point.recall == pytest.approx(flagged[labels == 1].mean())
    assert point.false_positive_rate == pytest.approx(flagged[labels == 0].mean())
    with pytest.raises(ValueError, match="one class"):
        f1_max_point([1, 1], [0.2, 0.3])


def _cards(html: str) -> list[dict[str, str]]:
    return [dict(re.findall(r'data-(\w+)="([^"]*)"', card)) for card in re.findall(r'<li class="card[^>]*>', html)]


@pytest.fixture(scope="module")
def predict_report(tiny_model_dir, tmp_path_factory):
    work = tmp_path_factory.mktemp("report")
    write_test_images(work / "images" / "coins" / "test" / "good", count=4)
    write_test_images(work / "images" / "moon" / "test" / "scratch", count=3, seed=2)
    (work / "images" / "moon" / "test" / "scratch" / "broken.png").write_bytes(b"not an image")
    output = work / "results"
    argv = ["predict", str(work / "images"), "--model", tiny_model_dir, "--output", str(output)]
    assert main([*argv, "--report", "--quiet", "--threshold", "0.45"]) == 3
    return output


def test_predict_report_lists_every_image_by_score_offline(predict_report):
    html = (predict_report / "report.html").read_text(encoding="utf-8")
    summary = json.loads((predict_report / "predictions.json").read_text())
    cards = _cards(html)
    assert len(cards) == len(summary["predictions"]) == 7
    scores = [float(card["score"]) for card in cards]
    assert scores == sorted(scores, reverse=True)
    by_score = {round(row["score"], 6): row for row in summary["predictions"]}
    for card in cards:
        row = by_score[round(float(card["score"]), 6)]
        assert card["verdict"] == ("anomalous" if row["is_anomalous"] else "ok")
        assert card["class"] == ("coins" if "/coins/" in row["path"] else "moon")
    assert 'id="image-threshold" data-value="0.45"' in html and "broken.png" in html  # skipped file listed
    sources = re.findall(r'(?:src|href)="([^"]+)"', html)
    assert sources and not [s for s in sources if s.startswith(("http:", "https:", "//"))]  # nothing from the web
    thumbnails = [s for s in sources if s.startswith("report_files/")]
    assert len(thumbnails) == 7 and all((predict_report / s).is_file() for s in thumbnails)
    assert html.count('loading="lazy"') == 7
    for link in (s for s in sources if s.startswith("overlays/")):
        assert (predict_report / link).is_file()


def test_predict_report_renders_and_filters_in_chromium(predict_report, tmp_path):
    require_chromium()
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    from .browser import headless_chromium

    summary = json.loads((predict_report / "predictions.json").read_text())
    anomalous = sum(row["is_anomalous"] for row in summary["predictions"])
    driver = headless_chromium()
    try:
        driver.get((predict_report / "report.html").as_uri())
        WebDriverWait(driver, 30).until(lambda d: d.execute_script("return document.body.dataset.ready") == "true")
        visible = [c for c in driver.find_elements(By.CSS_SELECTOR, "li.card") if c.is_displayed()]
        assert len(visible) == 7
        assert driver.find_element(By.ID, "image-threshold").text == "image threshold 0.4500"
        assert driver.find_element(By.ID, "total-anomalous").text == f"{anomalous} anomalous"
        assert driver.execute_script("return document.getElementById('score-histogram').naturalWidth") > 0
        first = driver.find_element(By.CSS_SELECTOR, "li.card img")
        assert driver.execute_script("return arguments[0].complete && arguments[0].naturalWidth", first) > 0
        Select(driver.find_element(By.ID, "filter-verdict")).select_by_value("anomalous")
        shown = [c for c in driver.find_elements(By.CSS_SELECTOR, "li.card") if c.is_displayed()]
        assert len(shown) == anomalous and driver.find_element(By.ID, "shown-count").text == f"{anomalous} of 7 shown"
        Select(driver.find_element(By.ID, "filter-verdict")).select_by_value("")
        Select(driver.find_element(By.ID, "filter-class")).select_by_value("moon")
        shown = [c for c in driver.find_elements(By.CSS_SELECTOR, "li.card") if c.is_displayed()]
        assert len(shown) == 3 and all(c.get_attribute("data-class") == "moon" for c in shown)
        Select(driver.find_element(By.ID, "filter-class")).select_by_value("")
        Select(driver.find_element(By.ID, "sort-order")).select_by_value("score-asc")
        scores = [float(c.get_attribute("data-score")) for c in driver.find_elements(By.CSS_SELECTOR, "li.card")]
        assert scores == sorted(scores)
        assert os.path.getsize(keep_screenshot(driver, tmp_path, "predict-report.png")) > 10_000
    finally:
        driver.quit()


def test_evaluate_report_has_metric_table_and_f1_max_points(tiny_model_dir, tmp_path):
    from crane_hf.data import generate_synthetic_dataset

    data = generate_synthetic_dataset(
        str(tmp_path / "data"), classes=["brick", "coins"], image_size=64, train_good=0, test_good=2, test_defective=1
    )
    output = tmp_path / "evaluation"
    assert (
        main(["evaluate", "--model", tiny_model_dir, "--data", data, "--output", str(output), "--report", "--quiet"])
        == 0
    )
    html = (output / "report.html").read_text(encoding="utf-8")
    metrics = json.loads((output / "metrics.json").read_text())["metrics"]
    cards = _cards(html)
    assert len(cards) == 14 and {c["class"] for c in cards} == {"brick", "coins"}
    assert sum(c["truth"] == "normal" for c in cards) == 4
    for name in ("brick", "coins"):
        row = re.search(rf"<tr><td>{name}</td>(.*?)</tr>", html).group(1)
        cells = re.findall(r"<td>([^<]*)</td>", row)
        assert cells[0] == f"{100 * metrics[name]['image_auroc']:.1f}"
        caption = re.search(rf"<figcaption>{name}: F1-max ([0-9.]+) at score", html).group(1)
        assert caption == f"{metrics[name]['image_f1_max']:.3f}"  # the point drawn is the table's F1-max
    overlays = set(re.findall(r'href="(overlays/[^"]+)"', html))  # thumbnail and "figure" links
    assert len(overlays) == 14 and all((output / link).is_file() for link in overlays)


@pytest.mark.parametrize("stem", ["hash#1", "q?x=1", "pct%41", "a&b <c> 'd' \"e\"", "colon:x", "ünï 日本"])
def test_report_links_reach_files_whose_names_url_syntax_would_break(tmp_path, stem):
    """A browser reads `#` as a fragment, `?` as a query, `%41` as "A" and `x:` as a scheme: every href and src of
    the page, decoded as a browser decodes it, must name the file that is there (and the name stays escaped)."""
    from urllib.parse import unquote, urljoin, urlparse

    from PIL import Image

    from crane_hf.reporting.run_report import write_run_report

    images, output = tmp_path / "images", tmp_path / "run"
    (output / "overlays").mkdir(parents=True)
    images.mkdir()
    image = images / f"{stem}.png"
    Image.fromarray(np.full((8, 8, 3), 90, np.uint8)).save(image)
    overlay = output / "overlays" / f"{stem}.png.png"
    Image.fromarray(np.full((8, 8, 3), 200, np.uint8)).save(overlay)
    rows = [{"path": str(image), "score": 0.7, "overlay": f"overlays/{stem}.png.png"}]
    page = write_run_report(str(output), rows, image_threshold=0.5, pixel_threshold=0.5, title="t")
    html = Path(page).read_text(encoding="utf-8")
    links = [link for link in re.findall(r'(?:src|href)="([^"]+)"', html) if not link.startswith("data:")]
    base = (output / "report.html").as_uri()
    targets = set()
    for link in links:
        link = link.replace("&amp;", "&").replace("&#34;", '"').replace("&#39;", "'").replace("&lt;", "<")
        link = link.replace("&gt;", ">")
        parsed = urlparse(urljoin(base, link))
        assert parsed.scheme == "file" and not parsed.fragment and not parsed.query, link
        target = unquote(parsed.path)
        assert os.path.isfile(target), (link, target)
        targets.add(target)
    assert {str(image), str(overlay)} <= targets
    assert "<c>" not in html  # the name is escaped, not markup


def _sixteen_bit_and_rotated(folder) -> tuple[str, str, np.ndarray]:
    """A 16-bit gradient PNG and a JPEG whose EXIF orientation (6) turns its 48 x 64 pixels to 64 x 48."""
    from PIL import Image

    gradient = np.linspace(0, 65535, 48 * 64).reshape(48, 64).astype(np.uint16)
    sixteen = os.path.join(folder, "sixteen.png")
    Image.fromarray(gradient).save(sixteen)
    rotated = os.path.join(folder, "exif6.jpg")
    photo = Image.fromarray(np.full((48, 64, 3), 100, np.uint8))
    exif = photo.getexif()
    exif[0x0112] = 6
    photo.save(rotated, exif=exif)
    # what the pipeline scores, brute force: 16-bit values over 65535, shown as 8-bit
    expected = np.floor(gradient.astype(np.float64) / 65535 * 255 + 0.5)
    return sixteen, rotated, expected


def test_report_thumbnails_show_the_image_the_model_scored(tmp_path):
    """Without decision figures (--no-overlays) the thumbnail is the image itself: a 16-bit image is scaled (not
    clipped to white) and a photo is upright, as the pipeline reads them."""
    from PIL import Image

    from crane_hf.reporting.run_report import write_run_report

    sixteen, rotated, expected = _sixteen_bit_and_rotated(str(tmp_path))
    output = tmp_path / "run"
    output.mkdir()
    large = str(tmp_path / "large16.png")  # reduced before it is shown: Pillow cannot reduce a 16-bit image itself
    Image.fromarray(np.linspace(0, 65535, 4000 * 1200).reshape(1200, 4000).astype(np.uint16)).save(large)
    rows = [{"path": sixteen, "score": 0.2}, {"path": rotated, "score": 0.1}, {"path": large, "score": 0.3}]
    html = Path(write_run_report(str(output), rows, image_threshold=0.5, pixel_threshold=0.5, title="t")).read_text()
    thumbnails = re.findall(r'src="(report_files/thumbnails/[^"]+)"[^>]*alt="([^"]+)"', html)
    shown = {name: np.asarray(Image.open(output / src).convert("L"), dtype=np.float64) for src, name in thumbnails}
    assert abs(shown["sixteen.png"].mean() - expected.mean()) < 3  # clipped to 8 bits it would be about 255
    assert shown["exif6.jpg"].shape == (64, 48)
    assert shown["large16.png"].shape == (144, 480) and abs(shown["large16.png"].mean() - 127.5) < 3


def _shown_numbers(text: str, *labels: str) -> list[float]:
    return [float(re.search(rf"{label}\s*([0-9.]+)", text).group(1)) for label in labels]


@pytest.mark.parametrize(("score", "threshold"), [(0.49996, 0.5), (0.4999999, 0.5), (0.5, 0.5), (0.50004, 0.5)])
def test_shown_score_and_threshold_never_contradict_the_verdict(tmp_path, score, threshold):
    """Score 0.49996 at threshold 0.5 is OK; written "score 0.500 (threshold 0.500)" a reader applying score >=
    threshold would call it anomalous. The figure, the report and the app show enough digits to tell them apart."""
    from crane_hf.reporting.gradio_app import render_state
    from crane_hf.reporting.run_report import write_run_report

    anomalous = score >= threshold
    image = np.zeros((8, 8, 3), np.uint8)
    anomaly_map = np.zeros((8, 8), np.float32)
    title = decision_figure(
        image, anomaly_map, score=score, image_threshold=threshold, pixel_threshold=0.5, name="a.png"
    ).get_suptitle()
    shown_score, shown_threshold = _shown_numbers(title, "score", "image threshold")
    assert ("ANOMALOUS" in title) == anomalous == (shown_score >= shown_threshold), title

    state = {"model": "m", "items": [{"name": "a.png", "image": image, "score": score, "map": anomaly_map}]}
    text, _, table = render_state(state, threshold, 0.5, "absolute", None)
    shown_score, shown_threshold = _shown_numbers(text, "score", "image threshold")
    assert (
        text.startswith("### ANOMALOUS" if anomalous else "### OK") and (shown_score >= shown_threshold) == anomalous
    )
    assert (float(table[0][1]) >= shown_threshold) == anomalous

    output = tmp_path / "run"
    output.mkdir()
    rows = [{"path": "a.png", "score": score}]
    html = Path(write_run_report(str(output), rows, image_threshold=threshold, pixel_threshold=0.5, title="t"))
    html = html.read_text(encoding="utf-8")
    shown_score = _shown_numbers(html, '<span class="score">score')[0]
    shown_threshold = _shown_numbers(html, 'id="image-threshold" data-value="[^"]*">image threshold')[0]
    assert (shown_score >= shown_threshold) == anomalous and ('data-verdict="anomalous"' in html) == anomalous


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -0.1, 1.5, "0.5x"])
@pytest.mark.parametrize("which", ["image_threshold", "pixel_threshold"])
def test_report_refuses_a_threshold_it_cannot_decide_with(tmp_path, bad, which):
    """score >= NaN is False: with a NaN image threshold a 0.9 image was written "ok". Nothing is written."""
    from crane_hf.reporting.run_report import write_run_report

    thresholds = {"image_threshold": 0.5, "pixel_threshold": 0.5, which: bad}
    with pytest.raises(ValueError, match=which):
        write_run_report(str(tmp_path), [{"path": "a.png", "score": 0.9}], title="t", **thresholds)
    assert not (tmp_path / "report.html").exists()


@pytest.mark.parametrize("name", ["cost$\\bad$.png", "a$x^2$.png", "line_3/$5 part.png"])
def test_decision_figure_writes_a_file_name_with_dollars_as_it_is(name):
    """matplotlib reads $...$ as mathematics: "a$x^2$.png" was drawn as a, x squared, and "cost$\\bad$.png" raised."""
    figure = decision_figure(
        np.zeros((8, 8, 3), np.uint8),
        np.zeros((8, 8), np.float32),
        score=0.3,
        image_threshold=0.5,
        pixel_threshold=0.5,
        name=name,
    )
    figure_to_image(figure)  # draws every text
    title = figure._suptitle
    assert name in title.get_text() and not title.get_parse_math()
    curves, _ = roc_pr_curves([0, 1, 0, 1], [0.1, 0.8, 0.3, 0.6], name)  # a class named by its folder, in a report
    svg_data_uri(curves)
    assert curves._suptitle.get_text() == name and not curves._suptitle.get_parse_math()
