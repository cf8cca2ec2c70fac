"""fim-lightning: input-space Fisher information of classifiers, for measuring and training robustness."""
from fim_lightning.algorithms import TopEigenpair, TraceEstimate
from fim_lightning.blackbox import (
    BlackBoxEstimate,
    blackbox_fisher,
    blackbox_fisher_spectral_norm,
    blackbox_fisher_trace,
    numpy_predictor,
)
from fim_lightning.bounds import SpectralBound, fisher_spectral_bound
from fim_lightning.callback import FisherRobustnessCallback
from fim_lightning.functional import (
    DistanceOptions,
    EstimatorOptions,
    OperatorOptions,
    estimated_minimal_perturbation,
    estimated_robust_accuracy,
    FisherScores,
    fisher_operator,
    fisher_robustness_radius,
    fisher_step,
    fisher_scores,
    fisher_spectral_norm,
    fisher_top_eigenpair,
    fisher_trace,
    fisher_vector_product,
)
from fim_lightning.guard import preserved_state
from fim_lightning.metric import FisherSpectralNorm
from fim_lightning.regularizers import (
    FisherKLPenalty,
    FisherPenalty,
    FisherSpectralPenalty,
    FisherTracePenalty,
    FisherWorstDirectionPenalty,
)
from fim_lightning.operator import FisherOperator
from fim_lightning.writers import FigureWriter, register_figure_writer

__all__ = [
    "BlackBoxEstimate",
    "FigureWriter",
    "FisherKLPenalty",
    "FisherOperator",
    "FisherPenalty",
    "FisherRobustnessCallback",
    "FisherSpectralNorm",
    "FisherSpectralPenalty",
    "FisherTracePenalty",
    "FisherWorstDirectionPenalty",
    "SpectralBound",
    "FisherScores",
    "DistanceOptions",
    "EstimatorOptions",
    "OperatorOptions",
    "TopEigenpair",
    "TraceEstimate",
    "blackbox_fisher",
    "estimated_minimal_perturbation",
    "estimated_robust_accuracy",
    "blackbox_fisher_spectral_norm",
    "blackbox_fisher_trace",
    "fisher_operator",
    "fisher_robustness_radius",
    "fisher_step",
    "fisher_scores",
    "fisher_spectral_bound",
    "fisher_spectral_norm",
    "fisher_top_eigenpair",
    "fisher_trace",
    "fisher_vector_product",
    "numpy_predictor",
    "preserved_state",
    "register_figure_writer",
]
__version__ = "0.1.0"
