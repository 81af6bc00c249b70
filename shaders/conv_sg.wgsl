// The register kernels of conv.wgsl with the weights shared through the subgroup, compiled
// with conv.wgsl in a module of its own (built only on adapters whose subgroups have 8 or more
// invocations). All 64 invocations of a workgroup take the same 8 columns (forward, input
// gradient: 512 rows x 8 columns per workgroup) or rows (weight gradient: 8 rows x 512
// columns); at each reduction step, lane l of each subgroup loads the shared operand of
// column (row) l and subgroupBroadcast hands the 8 values to the others: one load of it per
// invocation and step instead of 8.

// Lane l's value, from lanes 0-7 to every lane, as two vec4s.
fn spread8(v: f32) -> array<vec4<f32>, 2> {
    return array<vec4<f32>, 2>(
        vec4<f32>(subgroupBroadcast(v, 0u), subgroupBroadcast(v, 1u), subgroupBroadcast(v, 2u),
            subgroupBroadcast(v, 3u)),
        vec4<f32>(subgroupBroadcast(v, 4u), subgroupBroadcast(v, 5u), subgroupBroadcast(v, 6u),
            subgroupBroadcast(v, 7u)),
    );
}

fn load8_b(lo: vec4<u32>, hi: vec4<u32>, own: u32, k: u32) -> array<vec4<f32>, 2> {
    return spread8(f32(b[own + k]));
}

fn load8_a(lo: vec4<u32>, hi: vec4<u32>, own: u32, k: u32) -> array<vec4<f32>, 2> {
    return spread8(f32(a[own + k]));
}

// Every invocation runs to the end (rows past the end are clamped and not stored), so that the
// broadcasts see all 8 lanes; the column check is the same for the whole workgroup.
@compute @workgroup_size(64)
fn conv2d_sg_fwd(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>,
                 @builtin(subgroup_invocation_id) sl: u32) {
    let col0 = wid.y * 8u;
    if (col0 >= p.c_out / p.groups) {
        return;
    }
    conv_fwd_block(wid.z, p.row_base + (wid.x * 64u + lid.x) * 8u, col0, min(sl, 7u));
}

@compute @workgroup_size(64)
fn conv2d_sg_bwd_input(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>,
                       @builtin(subgroup_invocation_id) sl: u32) {
    let col0 = wid.y * 8u;
    if (col0 >= p.c_in / p.groups) {
        return;
    }
    conv_bwd_input_block(wid.z, p.row_base + (wid.x * 64u + lid.x) * 8u, col0, min(sl, 7u));
}

// Whole subgroups past the last column leave; in a partial one, every lane stays.
@compute @workgroup_size(64)
fn conv2d_sg_bwd_weight(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>,
                        @builtin(subgroup_invocation_id) sl: u32) {
    let row0 = p.row_base + wid.y * 8u;
    let col0 = (wid.x * 64u + lid.x) * 8u;
    let past = subgroupAll(col0 >= p.c_in / p.groups * p.kh * p.kw);
    if (row0 >= p.c_out / p.groups || past) {
        return;
    }
    conv_bwd_weight_block(wid.z / p.splits, wid.z % p.splits, row0, col0, min(sl, 7u));
}
