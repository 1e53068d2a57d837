from common.paths import REPO_ROOT


def test_repo_root_holds_the_project():
    assert REPO_ROOT.is_absolute()
    assert (REPO_ROOT / "pyproject.toml").is_file()
    assert (REPO_ROOT / "common" / "paths.py").is_file()
    assert (REPO_ROOT / "models" / "tiny-sd3").is_dir()
