import torch
from torch import nn
from vitbench.patching import attach, mixin_class


class Doubling:
    def forward(self, x):
        return 2 * super().forward(x)


class Scaled(nn.Linear):
    def extra(self):
        return "kept"


def test_attach_keeps_weights_keys_and_the_subclass_methods():
    layer = Scaled(3, 3)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    x = torch.randn(2, 3)
    plain = layer(x)
    assert attach(layer, Doubling) is layer
    assert isinstance(layer, Scaled) and isinstance(layer, Doubling)
    assert layer.extra() == "kept"
    torch.testing.assert_close(layer(x), 2 * plain)
    assert layer.state_dict().keys() == before.keys()
    assert all(torch.equal(layer.state_dict()[k], v) for k, v in before.items())


def test_attach_twice_is_a_no_op_and_classes_are_cached():
    a, b = attach(nn.Linear(2, 2), Doubling), attach(nn.Linear(2, 2), Doubling)
    cls = type(a)
    attach(a, Doubling)
    assert type(a) is cls is type(b) is mixin_class(Doubling, nn.Linear)
    assert cls.__name__ == "DoublingLinear" and mixin_class(Doubling, Scaled) is not cls


def test_a_mixin_that_subclasses_the_base_is_used_as_it_is():
    class DoublingLinear(Doubling, nn.Linear):
        pass

    assert mixin_class(DoublingLinear, nn.Linear) is DoublingLinear
    sub = mixin_class(DoublingLinear, Scaled)
    assert sub.__mro__[1] is DoublingLinear and issubclass(sub, Scaled) and sub.__name__ == "DoublingLinearScaled"
