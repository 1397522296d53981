"""Raw dataset readers (E2E, WebNLG, DART) and the stand-in base's pretraining corpus."""
