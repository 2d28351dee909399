"""The file MLflow runs to build the pyfunc model when it loads one ("models from code"): no pickle is stored or
loaded, so a tampered model artifact cannot run code through unpickling (as `weights_only=True` for checkpoints).
`serving.pyfunc.log_recommender_model` logs this file; MLflow copies it into the model and executes it at load."""
import mlflow.models

from serving.pyfunc import RecommenderPyfunc

mlflow.models.set_model(RecommenderPyfunc())
