#loc2 = loc("-":2:26)
module @jit_jaxpr_as_fun attributes {jax.uses_shape_polymorphism = false, mhlo.num_partitions = 1 : i32, mhlo.num_replicas = 1 : i32} {
  func.func public @main(%arg0: tensor<3xf32> loc("-":2:26)) -> (tensor<3x1xf32> {jax.result_info = "result[0]"}) {
    %0 = stablehlo.broadcast_in_dim %arg0, dims = [0] : (tensor<3xf32>) -> tensor<3x1xf32> loc(#loc3)
    return %0 : tensor<3x1xf32> loc(#loc4)
  } loc(#loc1)
} loc(#loc)
#loc = loc("-":1:1)
#loc1 = loc("-":2:3)
#loc3 = loc("-":3:10)
#loc4 = loc("-":4:5)
