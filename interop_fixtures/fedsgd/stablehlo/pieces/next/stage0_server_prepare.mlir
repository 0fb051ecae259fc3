#loc2 = loc("-":2:26)
#loc3 = loc("-":2:49)
#loc4 = loc("-":2:72)
#loc5 = loc("-":2:98)
module @jit_jaxpr_as_fun attributes {jax.uses_shape_polymorphism = false, mhlo.num_partitions = 1 : i32, mhlo.num_replicas = 1 : i32} {
  func.func public @main(%arg0: tensor<32xf32> loc("-":2:26), %arg1: tensor<10xf32> loc("-":2:49), %arg2: tensor<64x32xf32> loc("-":2:72), %arg3: tensor<32x10xf32> loc("-":2:98)) -> (tensor<32xf32> {jax.result_info = "result[0]"}, tensor<10xf32> {jax.result_info = "result[1]"}, tensor<64x32xf32> {jax.result_info = "result[2]"}, tensor<32x10xf32> {jax.result_info = "result[3]"}) {
    return %arg0, %arg1, %arg2, %arg3 : tensor<32xf32>, tensor<10xf32>, tensor<64x32xf32>, tensor<32x10xf32> loc(#loc6)
  } loc(#loc1)
} loc(#loc)
#loc = loc("-":1:1)
#loc1 = loc("-":2:3)
#loc6 = loc("-":3:5)
