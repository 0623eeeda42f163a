"""The post's optimizer: `tf.compat.v1.train.MomentumOptimizer` in Keras 3.

A module of its own because it imports Keras: `resnet_cifar/optim.py`, which lists
the optimizers by name, is imported by `config` before TensorFlow starts.
"""

import keras
from keras import ops

from resnet_cifar import fidelity


class TF1Momentum(keras.optimizers.Optimizer):
    """`tf.compat.v1.train.MomentumOptimizer` semantics in Keras 3.

        accum = momentum * accum + grad
        var  -= lr * accum

    Keras' SGD folds the rate into its velocity (v = m*v - lr*g), so after a
    learning-rate drop it keeps moving with the old rate's momentum for a while;
    TF1 multiplies the whole accumulator by the current rate, so a drop takes
    effect at once. The post's runs used TF1's rule, so this does too.
    """

    def __init__(self, learning_rate, momentum=fidelity.MOMENTUM, name="tf1_momentum", **kwargs):
        super().__init__(learning_rate=learning_rate, name=name, **kwargs)
        self.momentum = float(momentum)

    def build(self, variables):
        if self.built:
            return
        super().build(variables)
        self.accumulators = self.add_optimizer_variables(variables, "accumulator")

    def update_step(self, gradient, variable, learning_rate):
        lr = ops.cast(learning_rate, variable.dtype)
        gradient = ops.cast(gradient, variable.dtype)
        accum = self.accumulators[self._get_variable_index(variable)]
        self.assign(accum, ops.add(ops.multiply(accum, ops.cast(self.momentum, variable.dtype)), gradient))
        self.assign_sub(variable, ops.multiply(accum, lr))

    def get_config(self):
        config = super().get_config()
        config.update({"momentum": self.momentum})
        return config
