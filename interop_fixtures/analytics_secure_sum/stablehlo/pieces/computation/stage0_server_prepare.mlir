#loc2 = loc("-":2:26)
module @jit_jaxpr_as_fun attributes {jax.uses_shape_polymorphism = false, mhlo.num_partitions = 1 : i32, mhlo.num_replicas = 1 : i32} {
  func.func public @main(%arg0: tensor<f32> loc("-":2:26)) -> (tensor<f32> {jax.result_info = "result[0]"}) {
    return %arg0 : tensor<f32> loc(#loc3)
  } loc(#loc1)
} loc(#loc)
#loc = loc("-":1:1)
#loc1 = loc("-":2:3)
#loc3 = loc("-":3:5)
