# Joint tests of several coefficients: edgeR's QL F test and limma's moderated F on a three-dose pseudobulk.
# Usage: Rscript run_dose_ftest.R DIR   (reads DIR/counts.csv and DIR/samples.csv; writes DIR/pb_edgeR_QL_F.csv and
# DIR/pb_limma_voom_F.csv). Design ~ dose (low = reference); the joint test is "any difference among the doses",
# coefficients 2:3 (dosemid, dosehigh). Same pipeline as run_pseudobulk.R: filterByExpr, TMM.
suppressPackageStartupMessages({ library(edgeR); library(limma) })
dir <- commandArgs(TRUE)[1]
counts <- as.matrix(read.csv(file.path(dir, "counts.csv"), row.names = 1, check.names = FALSE))
cd <- read.csv(file.path(dir, "samples.csv"), row.names = 1)
cd$dose <- factor(cd$dose, levels = c("low", "mid", "high"))
stopifnot(identical(rownames(cd), colnames(counts)))
design <- model.matrix(~ dose, cd)
y <- DGEList(counts); keep <- filterByExpr(y, design); y <- calcNormFactors(y[keep, , keep.lib.sizes = FALSE])
y <- estimateDisp(y, design); fit <- glmQLFit(y, design, robust = TRUE)
tt <- glmQLFTest(fit, coef = 2:3)$table
mid <- glmQLFTest(fit, coef = 2)$table
write.csv(data.frame(gene = rownames(tt), F = tt$F, pvalue = tt$PValue, df_prior = fit$df.prior,
                     F_mid = mid$F, pvalue_mid = mid$PValue),
          file.path(dir, "pb_edgeR_QL_F.csv"), row.names = FALSE, quote = FALSE)
v <- voom(y, design); lf <- lmFit(v, design); eb <- eBayes(lf)
tf <- topTableF(eb[, 2:3], number = Inf, sort.by = "none")  # the F of coefficients 2:3 (eBayes on the subset)
tt2 <- topTable(eb, coef = 2:3, number = Inf, sort.by = "none")
stopifnot(isTRUE(all.equal(tf$F, tt2$F)))
write.csv(data.frame(gene = rownames(tf), F = tf$F, pvalue = tf$P.Value, df_total = eb$df.total,
                     t_mid = eb$t[, 2], pvalue_mid = eb$p.value[, 2]),
          file.path(dir, "pb_limma_voom_F.csv"), row.names = FALSE, quote = FALSE)
cat("genes tested:", nrow(tt), " F p < 0.05 (edgeR):", sum(tt$PValue < 0.05),
    " (limma):", sum(tf$P.Value < 0.05), "\n")
