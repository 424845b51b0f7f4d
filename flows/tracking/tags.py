"""The MLflow tags granite-forge writes on runs, logged models and model versions."""
TAG_KEY = "forge.key"                       # a stage's identity key
TAG_STAGE = "forge.stage"
TAG_KIND = "forge.kind"
TAG_PIPELINE = "forge.pipeline"
TAG_CONFIG_DIGEST = "forge.config_digest"   # sha256 of the stage's resolved config
