"""Behaviour: generation, and the behavioural evaluation of every checkpoint (trigger, false- and
near-trigger rates, clean capability) with its figures."""
from workbench.evaluation.behaviour import BehaviourConfig, evaluate_behaviour
from workbench.evaluation.generation import Generation, generate
from workbench.evaluation.plots import format_headline, headline

__all__ = ["BehaviourConfig", "Generation", "evaluate_behaviour", "format_headline", "generate", "headline"]
