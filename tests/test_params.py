"""params.yaml: every key required, unknown or mistyped keys and bad values are clear errors."""

import pytest
import yaml
from click.testing import CliRunner

from pipeline.params import ParamsError, load_params
from stages.cli import kd
from conftest import ROOT, write_params


def test_project_params_load():
    params = load_params(ROOT / "params.yaml")
    assert params.cache.format in ("zarr", "hdf5") and params.distill.temperature > 0


def test_mistyped_key_names_the_key_and_suggests_the_fix(tmp_path):
    path = write_params(tmp_path / "params.yaml")
    path.write_text(path.read_text().replace("temperature:", "temprature:"))
    with pytest.raises(ParamsError, match=r"unknown key 'distill.temprature'; did you mean 'distill.temperature'"):
        load_params(path)


@pytest.mark.parametrize("key, value, message", [
    ("distill.temperature", "hot", r"distill.temperature is 'hot'; expected float"),
    ("distill.temperature", 0, r"distill.temperature is 0.0; expected a finite number > 0"),
    ("distill.temperature", float("inf"), r"distill.temperature is inf; expected a finite number > 0"),
    ("distill.kd_weight", float("inf"), r"distill.kd_weight is inf; expected a finite number >= 0"),
    ("distill.optimizer.lr_factors", [-1.0], r"distill.optimizer.lr_factors is \[-1.0\]; expected finite numbers > 0"),
    ("distill.optimizer.lr_milestones", [500], r"lr_milestones \[500\] must be < distill.epochs"),
    ("distill.optimizer.name", "rmsprop", r"distill.optimizer.name is 'rmsprop'; expected adam, adamw .* or sgd"),
    ("distill.optimizer.warmup_epochs", -1, r"distill.optimizer.warmup_epochs is -1; expected an integer >= 0"),
    ("distill.optimizer.warmup_epochs", 2, r"distill.optimizer.warmup_epochs is 2; it must be < distill.epochs \(2\)"),
    ("teacher.optimizer.clip_grad_norm", 0, r"teacher.optimizer.clip_grad_norm is 0.0; expected null .* or a finite"),
    ("distill.optimizer.clip_grad_norm", "big", r"distill.optimizer.clip_grad_norm is 'big'; expected float"),
    ("distill.amp", "float8", r"distill.amp is 'float8'; expected auto .*, off, bfloat16 or float16"),
    ("teacher.amp", "fp16", r"teacher.amp is 'fp16'; expected auto"),
    ("distill.ema", 1.0, r"distill.ema is 1.0; expected null \(no EMA\) or a decay in \(0, 1\)"),
    ("teacher.ema", 0, r"teacher.ema is 0.0; expected null"),
    ("distill.compile", "yes", r"distill.compile is 'yes'; expected bool"),
    ("distill.channels_last", 1, r"distill.channels_last is 1; expected bool"),
    ("teacher.optimizer.schedule", "linear", r"teacher.optimizer.schedule is 'linear'; expected step or cosine"),
    ("seed", -1, r"seed is -1; expected an integer >= 0"),
    ("data.name", "imagenet", r"data.name is 'imagenet'; expected one of digits, mnist"),
    ("data.normalize", {"mean": [0.5], "std": [0.0]}, r"data.normalize .*expected auto, none, or"),
    ("data.normalize", {"mean": [0.5], "std": [float("inf")]}, r"data.normalize is .*'std': \[inf\].*each finite"),
    ("data.normalize", {"mean": [float("inf")], "std": [0.5]}, r"data.normalize is .*'mean': \[inf\].*finite number"),
    ("data.normalize", {"mean": [float("nan")], "std": [0.5]}, r"data.normalize is .*'mean': \[nan\]"),
    ("teacher.arch", "resnet21", r"teacher.arch: .*resnet21"),
    ("distill.student_options", {"hidden": [10]}, r"distill.student: .*hidden"),
    ("cache.format", "parquet", r"cache.format is 'parquet'; expected zarr or hdf5"),
    ("cache.num_views", 2.5, r"cache.num_views is 2.5; expected int"),
    ("distill.optimizer.lr_factors", [0.1, 0.01], r"one factor per entry of distill.optimizer.lr_milestones"),
    ("augment", [{"RandomAffine": 5}], r"augment\[0\]"),
])
def test_bad_values_are_refused(tmp_path, key, value, message):
    with pytest.raises(ParamsError, match=message):
        load_params(write_params(tmp_path / "params.yaml", **{key: value}))


def test_missing_key_is_an_error(tmp_path):
    path = write_params(tmp_path / "params.yaml")
    path.write_text(path.read_text().replace("  kd_weight:", "  # kd_weight:"))
    with pytest.raises(ParamsError, match="missing key 'distill.kd_weight'"):
        load_params(path)


def test_scientific_notation_without_a_dot_is_a_float(tmp_path):
    path = write_params(tmp_path / "params.yaml")
    path.write_text(path.read_text().replace("lr: 0.001", "lr: 1e-3"))
    assert load_params(path).distill.optimizer.lr == 1e-3


def test_cli_exits_nonzero_naming_the_bad_key(tmp_path):
    path = write_params(tmp_path / "params.yaml")
    path.write_text(path.read_text().replace("kd_weight:", "kd_wieght:"))
    result = CliRunner().invoke(kd, ["distill", "--params", str(path)])
    assert result.exit_code == 1
    assert "unknown key 'distill.kd_wieght'; did you mean 'distill.kd_weight'" in result.output


def test_cli_missing_params_file(tmp_path):
    result = CliRunner().invoke(kd, ["teacher", "--params", str(tmp_path / "nope.yaml")])
    assert result.exit_code == 1 and "nope.yaml: file not found" in result.output


def test_every_bad_value_is_reported_at_once(tmp_path):
    path = write_params(tmp_path / "params.yaml", **{"distill.temperature": 0, "cache.format": "parquet",
                                                     "seed": -3})
    with pytest.raises(ParamsError) as e:
        load_params(path)
    message = str(e.value)
    assert "3 problems" in message
    for key in ("distill.temperature", "cache.format", "seed"):
        assert key in message


@pytest.mark.parametrize("recipe", sorted((ROOT / "recipes").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_recipe_validates(recipe):
    params = load_params(recipe)  # every key known, every value allowed
    assert params.data.name != "digits"


@pytest.mark.parametrize("key, value, message", [
    ("device", "tpu", r"device is 'tpu'; expected auto, cpu, cuda, cuda:N or mps"),
    ("device", "gpu", r"device is 'gpu'"),
    ("augment", [{"Resize": {"size": 8}}], r"augment\[0\]: Resize is deterministic preprocessing"),
    ("augment", [{"RandomCrop": {"size": 8}}, {"Normalize": {"mean": [0.5], "std": [0.0]}}],
     r"augment\[1\]: Normalize is deterministic"),
    ("augment", [{"RandomAffine": {"degres": 10}}], r"augment\[0\]: RandomAffine\(.*degres"),
    ("data.normalize", {"mean": [0.5], "std": [0.0]}, r"data.normalize"),
])
def test_devices_and_augmentation_are_checked_before_any_work(tmp_path, key, value, message):
    with pytest.raises(ParamsError, match=message):
        load_params(write_params(tmp_path / "params.yaml", **{key: value}))


def test_a_bare_off_is_the_precision_off_not_a_type_error(tmp_path):
    """YAML 1.1 reads `amp: off` (and `dvc exp run -S distill.amp=off`) as false: it means the precision off."""
    path = tmp_path / "params.yaml"
    path.write_text((ROOT / "params.yaml").read_text().replace("  amp: auto                  # the student's",
                                                               "  amp: off                   # the student's"))
    assert load_params(path).distill.amp == "off"


def test_the_recipe_keys_default_to_todays_training(tmp_path):
    """The project's params: no warm-up, no clipping, no EMA, no compile, channels-first; amp auto (off on a CPU)."""
    p = load_params(ROOT / "params.yaml")
    for opt in (p.teacher.optimizer, p.distill.optimizer):
        assert opt.warmup_epochs == 0 and opt.clip_grad_norm is None
    assert (p.distill.amp, p.distill.ema, p.distill.compile, p.distill.channels_last) == ("auto", None, False, False)
    assert (p.teacher.amp, p.teacher.ema) == ("auto", None)


def test_shortening_a_run_is_one_edit(tmp_path):
    """`dvc exp run -S distill.epochs=5` on the project's params: the milestones are fractions, so they follow."""
    from pipeline.params import milestone_epochs

    project = load_params(ROOT / "params.yaml").distill
    assert milestone_epochs(project.optimizer.lr_milestones, project.epochs) == [120]  # of 150: trains as before
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["distill"]["epochs"] = 5
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    short = load_params(tmp_path / "params.yaml").distill
    assert milestone_epochs(short.optimizer.lr_milestones, short.epochs) == [4]


def test_absolute_milestones_still_load(tmp_path):
    params = load_params(write_params(tmp_path / "params.yaml", **{"distill.epochs": 200,
                                                                   "distill.optimizer.lr_milestones": [180]}))
    assert params.distill.optimizer.lr_milestones == [180]


@pytest.mark.parametrize("milestones, factors, epochs, message", [
    ([120, 0.9], [0.1, 0.01], 150, r"distill.optimizer.lr_milestones is \[120, 0.9\]; expected .*epochs .*"
                                   r"or .*fractions of the epochs .*not a mix"),
    ([0.5, 1.5], [0.1, 0.01], 150, r"distill.optimizer.lr_milestones is \[0.5, 1.5\]; expected"),
    ([0.7, 0.9], [0.1, 0.01], 5, r"distill.optimizer.lr_milestones: 0.7 and 0.9 of distill.epochs \(5\) .*both fall "
                                 r"on epoch 4"),
    ([0.1], [0.1], 5, r"distill.optimizer.lr_milestones: 0.1 of distill.epochs \(5\) .*falls on epoch 0"),
    ([0.95], [0.1], 10, r"distill.optimizer.lr_milestones: 0.95 of distill.epochs \(10\) .*falls on epoch 10"),
])
def test_bad_fractional_milestones_are_refused(tmp_path, milestones, factors, epochs, message):
    with pytest.raises(ParamsError, match=message):
        load_params(write_params(tmp_path / "params.yaml", **{"distill.epochs": epochs,
                                                              "distill.optimizer.lr_milestones": milestones,
                                                              "distill.optimizer.lr_factors": factors}))
