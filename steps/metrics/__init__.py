"""Scoring: BLEU/NIST/METEOR/ROUGE-L/CIDEr (scorers), the slot error rate, GenerationEval's tokeniser, the evaluation report."""
