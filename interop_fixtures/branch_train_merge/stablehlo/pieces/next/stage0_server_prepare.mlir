#loc2 = loc("-":2:26)
#loc3 = loc("-":2:51)
#loc4 = loc("-":2:76)
#loc5 = loc("-":2:104)
module @jit_jaxpr_as_fun attributes {jax.uses_shape_polymorphism = false, mhlo.num_partitions = 1 : i32, mhlo.num_replicas = 1 : i32} {
  func.func public @main(%arg0: tensor<2x32xf32> loc("-":2:26), %arg1: tensor<2x10xf32> loc("-":2:51), %arg2: tensor<2x64x32xf32> loc("-":2:76), %arg3: tensor<2x32x10xf32> loc("-":2:104)) -> (tensor<2x32xf32> {jax.result_info = "result[0]"}, tensor<2x10xf32> {jax.result_info = "result[1]"}, tensor<2x64x32xf32> {jax.result_info = "result[2]"}, tensor<2x32x10xf32> {jax.result_info = "result[3]"}) {
    return %arg0, %arg1, %arg2, %arg3 : tensor<2x32xf32>, tensor<2x10xf32>, tensor<2x64x32xf32>, tensor<2x32x10xf32> loc(#loc6)
  } loc(#loc1)
} loc(#loc)
#loc = loc("-":1:1)
#loc1 = loc("-":2:3)
#loc6 = loc("-":3:5)
