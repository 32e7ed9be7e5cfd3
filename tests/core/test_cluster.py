from bh_models.core.cluster import setting


def test_environment_wins_then_user_file(tmp_path, monkeypatch):
    user = tmp_path / "slurm.yaml"
    user.write_text("partition: gpu\naccount: lab\n")
    monkeypatch.delenv("BH_SLURM_PARTITION", raising=False)
    assert setting("partition", user_file=user) == "gpu"
    monkeypatch.setenv("BH_SLURM_PARTITION", "h100")
    assert setting("partition", user_file=user) == "h100"
    assert setting("account", user_file=tmp_path / "absent.yaml") in ("", __import__("os").environ.get("BH_SLURM_ACCOUNT", ""))
