"""What every stage uses: errors and atomic files (common), process management (process), the runtime set-up, MLflow (tracking)."""
