"""Train the multimodal sequential recommender on Ray and track it in MLflow.

    python -m jobs.train --preset tiny
    ray job submit --working-dir . -- python -m jobs.train --preset movielens
Reusing --set train.run_name=NAME resumes that run from its latest checkpoint.
"""
from __future__ import annotations

import argparse

from jobs.cli import add_config_arguments, config_from_args, run_main


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser)
    args = parser.parse_args()
    job = config_from_args(args)
    from training.driver import format_results, run_training

    outcome = run_training(job)
    chosen = outcome.selection or outcome  # with train.refit the refit's epochs were chosen by the selection run
    print(f"\nTest metrics of the best checkpoint (epoch {chosen.metrics.get('best_epoch', '?')} of "
          f"{chosen.last_metrics.get('epoch', '?')}, by validation {job.train.selection_metric} "
          f"averaged over the last {job.train.selection_window} epochs or fewer; "
          + (f"then refitted: that many epochs retrained on the training and validation examples, the refit's "
             f"last epoch tested; the selection run's own test {job.train.selection_metric} "
             f"{chosen.metrics.get(f'test_{job.train.selection_metric}', float('nan')):.4f}; "
             if outcome.selection is not None else "")
          + (f"weights: their moving average over ~{job.train.average_epochs:g} epochs; "
             if job.train.average_epochs > 0 else "")
          + f"{job.data.split}, "
          f"full ranking over the catalogue, history {'masked' if job.train.eval_mask_history else 'not masked'}):")
    print(format_results(outcome, job.train.eval_ks, job.train.eval_mask_history))
    print(f"\nMLflow run: {outcome.mlflow_run_id} ({outcome.tracking_uri}); checkpoint: {outcome.checkpoint_path}")
    print(f"Browse: mlflow ui --backend-store-uri {outcome.tracking_uri}")
    if job.tracking.registered_model and outcome.checkpoint_path:
        from serving.pyfunc import log_recommender_model
        from training.registry import register_training_run

        # the version is also an MLflow pyfunc model: mlflow.pyfunc.load_model("models:/NAME@champion")
        version, champion = register_training_run(job, run_id=outcome.mlflow_run_id,
                                                   checkpoint_path=outcome.checkpoint_path, metrics=outcome.metrics,
                                                   serving_model=log_recommender_model)
        print(f"Registered models:/{version.name}/{version.version}" + (" as @champion (the first)" if champion else ""))
    return 0


if __name__ == "__main__":
    run_main(main)
