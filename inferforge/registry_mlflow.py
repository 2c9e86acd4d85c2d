"""Mirror a registered version into an MLflow model registry (`registry add --mlflow-uri URI`).

MLflow is optional and imported only here, only when asked for. The stored copy's files are logged as
the artifacts of one MLflow run (under `artifact/`), a model version of the same name is created from
them, tagged with the inferforge version, content version and manifest sha256, and given the same
alias. MLflow numbers its versions itself; the tag `inferforge_version` links the two.
"""

from __future__ import annotations

from inferforge.errors import UserInputError


def require_mlflow():
    """The `mlflow` module, or one clear UserInputError when it is not installed."""
    try:
        import mlflow
    except ImportError:
        raise UserInputError("--mlflow-uri needs the optional package mlflow, which is not installed "
                             "(pip install mlflow); nothing was registered") from None
    return mlflow


def register_in_mlflow(version, uri: str, alias: str | None = None) -> dict:
    """Register the inferforge `version` (a `registry.Version`) as a model version in the MLflow registry
    at `uri` (a tracking URI such as file:///path/mlruns or http://host:5000); returns
    {"name", "version", "run_id", "source"} of the MLflow model version."""
    require_mlflow()
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    tags = {"inferforge_name": version.name, "inferforge_version": str(version.version),
            "inferforge_content": version.content, "manifest_sha256": version.manifest_sha256,
            "owner": version.owner}
    try:
        experiment = client.get_experiment_by_name("inferforge-registry")
        experiment_id = (experiment.experiment_id if experiment is not None
                         else client.create_experiment("inferforge-registry"))
        run = client.create_run(experiment_id, tags=tags, run_name=f"{version.name}@{version.version}")
        client.log_artifacts(run.info.run_id, str(version.path), artifact_path="artifact")
        client.set_terminated(run.info.run_id)
        try:
            client.get_registered_model(version.name)
        except MlflowException:   # not there yet
            client.create_registered_model(version.name)
        source = f"{run.info.artifact_uri.rstrip('/')}/artifact"
        model_version = client.create_model_version(version.name, source, run_id=run.info.run_id, tags=tags)
        if alias is not None:
            client.set_registered_model_alias(version.name, alias, model_version.version)
    except MlflowException as e:
        raise UserInputError(f"--mlflow-uri {uri}: MLflow refused the registration ({str(e).splitlines()[0]}); "
                             f"{version.ref} is registered in inferforge's registry, add it again to retry") from None
    return {"name": version.name, "version": model_version.version, "run_id": run.info.run_id, "source": source}
