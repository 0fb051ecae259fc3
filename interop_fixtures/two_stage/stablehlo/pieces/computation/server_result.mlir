#loc2 = loc("-":2:26)
#loc3 = loc("-":2:48)
module @jit_jaxpr_as_fun attributes {jax.uses_shape_polymorphism = false, mhlo.num_partitions = 1 : i32, mhlo.num_replicas = 1 : i32} {
  func.func public @main(%arg0: tensor<3xf32> loc("-":2:26), %arg1: tensor<3xf32> loc("-":2:48)) -> (tensor<3xf32> {jax.result_info = "result[0]"}, tensor<3xf32> {jax.result_info = "result[1]"}) {
    return %arg0, %arg1 : tensor<3xf32>, tensor<3xf32> loc(#loc4)
  } loc(#loc1)
} loc(#loc)
#loc = loc("-":1:1)
#loc1 = loc("-":2:3)
#loc4 = loc("-":3:5)
