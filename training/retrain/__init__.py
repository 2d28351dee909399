"""Incremental retraining: `config` (RetrainConfig), `lock` (one retrain per model at a time), `selection`
(which interactions a challenger trains and is judged on), `gate` (the promotion decision) and `run` (the
orchestration, `run_retrain`). Import the module you need; this package imports nothing."""
