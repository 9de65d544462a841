"""Fine-tuning under the anchor pattern: the training forward and the gradient step across hosts.

``star_train_loss(model, context_ids, target_ids, labels, config, group)`` gives a loss whose backward,
followed by ``reduce_gradients(model, group)``, leaves on every rank exactly the gradient of the plain
model under the dense ``M_star`` mask (``loss.py`` states the contract).
"""

from .grads import guarded_backward, reduce_gradients
from .loss import IGNORE_INDEX, star_train_loss

__all__ = ["IGNORE_INDEX", "guarded_backward", "reduce_gradients", "star_train_loss"]
